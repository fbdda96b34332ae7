"""GPT definition, config-by-depth, chat rendering and loss masks, checkpoint I/O.

    from model.config import ModelConfig       # the shape; param counts and FLOPs/token
    from model.gpt import GPT                  # the network (GPT.build(config, device, compute_dtype))
    from model.attention import AttentionMeta  # explicit attention metadata passed down to every layer
    from model.chat import render_conversation, render_for_completion, parse_assistant_parts
    from model.io import save_model, load_model

Nothing is imported here, so `model.chat` (used by servers and data code) loads without torch.
"""
