"""GPT definition, config-by-depth, chat rendering and loss masks, checkpoint I/O.

Not built yet: the model arrives with its issue; this package exports nothing until then.
"""
