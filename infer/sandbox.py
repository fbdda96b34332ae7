"""Tool sandbox: run model-written Python in a separate, limited process and report what happened.

`run_python(code)` starts a fresh interpreter per call and returns a `SandboxResult`; `ToolExecutor` runs calls
on a small thread pool so the engine submits a tool call and keeps decoding other sequences meanwhile.

How one call runs (two stages, no `preexec_fn`, so it is safe to call from many threads at once):
  parent   mkdtemp (chowned to the sandbox uid), writes the code to main.py, starts stage 1 with a minimal env,
           stdin=/dev/null, stdout/stderr pipes, a new session (so it leads its own process group).
  stage 1  trusted bootstrap (our code, `python -I -S`, still root when we are root): new empty network
           namespace, rlimits, new PID namespace (fork: a small unprivileged init as pid 1 that reaps orphans),
           drop to the sandbox uid, no_new_privs, parent-death signal, then exec stage 2 as pid 2.
  stage 2  unprivileged `python -I -S -u`: installs a socket audit hook, runs main.py in fresh globals. Its
           interpreter is probed once as the sandbox uid (ours may sit under a directory that uid cannot read,
           e.g. pyenv under /root: here that picks /usr/bin/python3, so the code sees the stdlib only).
  parent   reads stdout/stderr with a cap until stage 1 exits (pidfd), the timeout or an overflow, then
           SIGKILLs the process group and (when a uid was dropped to) every process of that uid, removes the temp
           dir and the uid's /tmp leftovers.
           Without namespaces (refused) the same code runs with only the rlimits, uid, hook and kills.

What it stops, and what each limit relies on:
  - wall time (timeout_s): the parent's deadline; on expiry SIGKILL to the process group + the uid sweep.
  - CPU time (cpu_s): RLIMIT_CPU (soft = cpu_s -> SIGXCPU, hard = cpu_s + 1 -> SIGKILL). Per process: a child
    that forks gets its own budget, which is why the wall limit and the process limit also exist.
  - memory (memory_mb): RLIMIT_AS, so big allocations raise MemoryError (or the process dies). Per process.
  - file size (max_file_mb): RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with OSError(EFBIG).
  - open files (max_open_files): RLIMIT_NOFILE. Core dumps: RLIMIT_CORE = 0.
  - orphans and escapees: the PID namespace (root, or unprivileged inside a user namespace): when its init dies,
    the kernel kills everything in it, whatever process group or session it moved to.
  - process count (max_procs): RLIMIT_NPROC, counted per *real uid* by the kernel and not enforced for root
    (CAP_SYS_RESOURCE). So as root every call drops to its own uid from a pool of unused uids (61000..,
    `UID_POOL_BASE`): the count is then per call, a fork bomb in one call cannot starve another, and "kill every
    process of this uid" (kill(-1) sent *as* that uid, atomic w.r.t. fork) also catches children that left the
    process group with setsid(). Not root: RLIMIT_NPROC is set to (threads our uid already runs + max_procs)
    and the process group + PID namespace are killed.
  - writes outside the temp dir: file permissions, because the code runs as an unprivileged uid that owns only
    the temp dir (and can write where everyone can: /tmp, /var/tmp, /dev/shm — swept for that uid after the
    call). Not root: no uid change, so the code can write wherever *we* can (only the cwd/HOME/TMPDIR point
    to the temp dir).
  - environment secrets: the child gets only PATH, LANG, HOME/TMPDIR (= the temp dir), USER/LOGNAME; as another
    uid it also cannot read our /proc/<pid>/environ. Not root: /proc/<parent>/environ IS readable.
  - network: as root, unshare(CLONE_NEWNET) gives an empty namespace (loopback down: even 127.0.0.1 is
    unreachable, whatever the code execs). Not root: tries an unprivileged user+network namespace; if that is
    refused too, the seccomp filter (below) still refuses them; without it only the audit hook is left, which
    blocks socket creation (all families but AF_UNIX) in stage 2 and in its forks but is bypassed by ctypes or by
    exec'ing another program. The hook is installed always.
  - privilege gain: PR_SET_NO_NEW_PRIVS, so setuid binaries (su, sudo, ping) give nothing.
  - syscalls (when the native launcher is built, `SECCOMP_LAUNCHER`; ./run_speedrun.sh builds it with cmake):
    stage 2 is exec'd through native/seccomp_exec.c, whose seccomp filter answers EPERM to sockets other than
    AF_UNIX (so the network stays closed even via ctypes or another program), new namespaces, ptrace and
    process_vm_*, mounts, bpf, perf_event_open, userfaultfd, io_uring, keyrings, modules, kexec, reboot and clock
    setting, and kills on a foreign syscall ABI. The filter is inherited by everything the code starts.
    `SandboxResult.seccomp` says whether it was on.
  - output: each of stdout/stderr is kept up to max_output_bytes; on overflow the process is killed (nothing more
    it prints could be shown, and a flood would otherwise use the whole wall budget) and a marker is appended.
  - stdin: /dev/null. Orphans: everything is killed after every call, also after a normal exit.

What it does NOT stop (this is rlimits + uid + namespaces + a seccomp deny list, not a VM or a container):
  - reading any world-readable file (/etc/passwd, the Python stdlib, world-readable repo files, /proc info);
  - writing world-writable places during the call (/tmp etc.; cleaned afterwards only at top level by owner),
    and filling the disk with many files each under the size limit (no quota);
  - CPU-/memory-heavy work within the limits, memory spread over max_procs processes (max_procs * memory_mb);
  - kernel attack surface: the seccomp filter is a deny list, so every syscall it does not name stays reachable
    (and without the built launcher there is no filter at all); side channels (timing, cache, /proc);
  - AF_UNIX sockets to reachable socket files (subject to permissions), and the network when neither
    namespace works (hook bypassable, see above);
  - a uid from the pool is reused later: anything it left outside the swept places survives;
  - `memory_mb` below ~30 does not leave room for the interpreter itself.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Built by CMakeLists.txt (./run_speedrun.sh does it): installs the seccomp filter of native/seccomp_exec.c.
SECCOMP_LAUNCHER = Path(__file__).resolve().parents[1] / "build" / "native" / "fc_seccomp_exec"
UID_POOL_BASE = 61000  # sandbox uids: UID_POOL_BASE .. +UID_POOL_SIZE, skipping any that /etc/passwd names
UID_POOL_SIZE = 64
TRUNCATION_MARKER = "\n[... output truncated at {n} bytes]"
_SETUP_FAILED_EXIT = 126  # stage 1 exits with this when it cannot build the jail; the code never ran

# Stage 1 runs our code only, as root when we are root. It builds the jail, then execs stage 2. Any failure here
# is fatal: running the user's code with a half-built jail would be worse than not running it.
_STAGE1 = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWPID = 0x40000000, 0x10000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    os._exit(126)

def unshare(flags):
    if hasattr(os, "unshare"):  # Python 3.12+
        try:
            os.unshare(flags)
            return True
        except OSError:
            return False
    return libc.unshare(flags) == 0

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

if cfg["isolate_network"] and not unshare(CLONE_NEWNET) and os.geteuid() != 0:
    # Unprivileged fallback: a user namespace lets us own a network namespace. Map our own uid/gid 1:1 so files
    # we create keep a real owner (an unmapped uid cannot create files).
    uid, gid = os.getuid(), os.getgid()
    if unshare(CLONE_NEWUSER | CLONE_NEWNET):
        try:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
            write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
        except OSError as e:
            fail("user namespace maps: %s" % e)

def limit(res, soft, hard=None):
    hard = soft if hard is None else hard
    cur_hard = resource.getrlimit(res)[1]
    if cur_hard != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(res, (soft, hard))

try:
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    limit(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
    limit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20)
    limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    limit(resource.RLIMIT_NPROC, cfg["nproc"])
except (OSError, ValueError) as e:
    fail("rlimits: %s" % e)

def pass_on(status):
    # Exit the way the waited-for process did, so our own parent sees the same code or signal.
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:  # SIGKILL's handler cannot be set (and is always the default)
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))

# A new PID namespace (root, or inside the user namespace above): when its first process (pid 1) dies the kernel
# kills every process in it, so children that left the process group (setsid) die too, and nothing inside can see
# or signal processes outside. It applies to our children only, hence the forks:
#   stage 1 (stays root) -- waits, passes the status on
#     ns init (pid 1, unprivileged) -- reaps orphans (zombies count against RLIMIT_NPROC), exits when the code does
#       stage 2 (pid 2) -- the code. Not pid 1 itself: the kernel drops default-action signals sent to a
#       namespace's init, which would make SIGXCPU and the code's own signals do nothing.
in_pidns = unshare(CLONE_NEWPID)
if in_pidns:
    rfd, wfd = os.pipe()
    init = os.fork()
    if init:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        os.close(wfd)
        _, status = os.waitpid(init, 0)
        reported = os.read(rfd, 64)
        pass_on(int(reported) if reported else status)
    os.close(rfd)

if cfg["uid"] is not None:
    try:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])  # as root this sets real, effective and saved uid and clears all capabilities
    except OSError as e:
        fail("dropping privileges: %s" % e)
    if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"]:
        fail("still privileged after setuid")
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("no_new_privs: errno %d" % ctypes.get_errno())
libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after setuid (which clears it): die with our parent

if in_pidns:
    code_pid = os.fork()
    if code_pid:  # ns init: reap everything until the code's process is gone, then report its status upward
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            if pid == code_pid:
                os.write(wfd, str(status).encode())
                os._exit(0)
    os.close(wfd)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
py = cfg["python"]
argv = [py, "-I", "-S", "-u", "-c", cfg["stage2"], cfg["code_path"]]
if cfg["launcher"]:  # native/seccomp_exec.c installs the seccomp filter, then execs stage 2
    argv = [cfg["launcher"]] + argv
try:
    os.execv(argv[0], argv)
except OSError as e:
    fail("exec stage 2: %s" % e)
"""

# Stage 2 is unprivileged. The audit hook is the network guard of last resort (see the module docstring).
_STAGE2 = r"""
import sys, traceback

def _no_network(event, args):
    if event == "socket.__new__" and args[1] != 1:  # args = (sock, family, type, proto); 1 == AF_UNIX
        raise PermissionError("network access is disabled in the sandbox")

sys.addaudithook(_no_network)
_path = sys.argv[1]
sys.argv = [_path]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
_globals = {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__}
try:
    exec(_code, _globals)
except SystemExit:
    raise
except BaseException as _e:
    # Drop our own frame so the model sees only its code in the traceback.
    traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)
    sys.stderr.flush()
    sys.exit(1)
"""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal (subprocess convention)
    timed_out: bool
    killed_reason: str | None  # "timeout" | "cpu_limit" | "output_limit" | "signal:SIG..." | "sandbox_error" | None
    truncated: bool
    wall_s: float
    seccomp: bool = False  # the code ran under native/seccomp_exec.c's filter

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None

    def as_tool_output(self) -> str:
        """The text the engine forces back between <|output_start|> and <|output_end|>."""
        text = self.stdout
        if not self.ok and self.stderr:
            text += ("\n" if text and not text.endswith("\n") else "") + self.stderr
        if self.killed_reason:
            text += f"\n[killed: {self.killed_reason}]"
        return text


class _UidPool:
    """Unused uids handed out one per running call, so RLIMIT_NPROC and the kill sweep are per call.

    FIFO, and a uid that still owns processes is skipped: killed processes stay zombies until their new parent
    (init) reaps them, and zombies still count against the uid's RLIMIT_NPROC (this container's init reaps
    every ~2 s), so reusing the uid at once would make the next call's fork() fail.
    """

    def __init__(self, base: int, size: int):
        free = collections.deque()
        for uid in range(base, base + size):
            try:
                pwd.getpwuid(uid)  # a real account: never run untrusted code as it
            except KeyError:
                free.append(uid)
        self._free = free
        self._cond = threading.Condition()

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            for _ in range(len(self._free)):
                uid = self._free.popleft()
                if not _pids_of_uid(uid, zombies=True):
                    return uid
                self._free.append(uid)
            return self._free.popleft()  # all busy (only under heavy churn): the oldest one, swept by the caller

    def release(self, uid: int) -> None:
        with self._cond:
            self._free.append(uid)
            self._cond.notify()


_uid_pool: _UidPool | None = None
_stage2_python: dict[bool, str] = {}
_seccomp_launchers: dict[bool, str | None] = {}
_init_lock = threading.Lock()


def _get_uid_pool() -> _UidPool:
    global _uid_pool
    with _init_lock:
        if _uid_pool is None:
            _uid_pool = _UidPool(UID_POOL_BASE, UID_POOL_SIZE)
        return _uid_pool


def _minimal_env(tmp: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
            "USER": "sandbox", "LOGNAME": "sandbox"}


def _runs_as(uid: int | None, argv: list[str]) -> bool:
    """Whether `argv` exits 0 when run as `uid` (None: as this process) from / with the sandbox's minimal env."""
    ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    try:
        r = subprocess.run(argv, cwd="/", env=_minimal_env("/"), stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=30, **ids)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _pick_stage2_python(uid: int | None) -> str:
    """An interpreter the sandbox uid can run *and import the stdlib with*.

    Ours may live where another uid cannot read (e.g. pyenv under /root, mode 700); then its stdlib imports fail
    after the drop, so we probe candidates as that uid once and keep the first that works.
    """
    key = uid is not None
    with _init_lock:
        if key in _stage2_python:
            return _stage2_python[key]
        if uid is None:
            _stage2_python[key] = sys.executable
            return sys.executable
        candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                      "/usr/bin/python3", "/usr/local/bin/python3"]
        for py in dict.fromkeys(candidates):
            if not os.path.exists(py):
                continue
            if _runs_as(uid, [py, "-I", "-S", "-c", "import json, math, traceback, collections, re"]):
                _stage2_python[key] = py
                return py
        raise RuntimeError(f"no Python interpreter is usable by sandbox uid {uid}; tried {candidates}")


def _seccomp_launcher(uid: int | None, python: str) -> str | None:
    """The seccomp launcher's path when it is built and, run as the sandbox uid, starts `python` under its filter
    (probed once per uid kind: the build dir may be unreadable for that uid, or the kernel may lack seccomp)."""
    key = uid is not None
    with _init_lock:
        if key in _seccomp_launchers:
            return _seccomp_launchers[key]
        path = str(SECCOMP_LAUNCHER)
        works = os.access(path, os.X_OK) and _runs_as(uid, [path, python, "-I", "-S", "-c", "pass"])
        _seccomp_launchers[key] = path if works else None
        return _seccomp_launchers[key]


def _threads_of_uid(uid: int) -> int:
    n = 0
    for status in _proc_statuses():
        if status.get("Uid", "").split()[:1] == [str(uid)]:
            n += int(status.get("Threads", "1"))
    return n


def _proc_statuses():
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:  # the process exited while we looked
            continue
        fields["Pid"] = name
        yield fields


def _pids_of_uid(uid: int, zombies: bool = False) -> list[int]:
    return [int(s["Pid"]) for s in _proc_statuses()
            if s.get("Uid", "").split()[:1] == [str(uid)] and (zombies or not s.get("State", "").startswith("Z"))]


def live_pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is `uid`, zombies excluded (they hold no memory/CPU and only their parent reaps)."""
    return _pids_of_uid(uid)


def _kill_uid(uid: int, python: str) -> None:
    # kill(-1, SIGKILL) sent *as* the uid reaches exactly that uid's processes, and the kernel does it under the
    # tasklist lock, so a fork bomb cannot outrun it; repeat until /proc shows none (bounded, just in case).
    for _ in range(20):
        if not live_pids_of_uid(uid):
            return
        subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                       user=uid, group=uid, extra_groups=[], cwd="/", env={}, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        time.sleep(0.01)


def _remove_uid_leftovers(uid: int) -> None:
    for root in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = os.listdir(root)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(root, name)
            try:
                if os.lstat(path).st_uid == uid:
                    _rmtree_force(path)
            except OSError:
                pass


def _rmtree_force(path: str) -> None:
    # The code may chmod its files/dirs to 000; as non-root we must restore permissions before removing.
    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=retry)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until the main process exits, the deadline or an overflow.

    Returns (stdout, stderr, the reason we must kill or None). EOF on the pipes is not the end: background children
    the code forked hold them open, so the main process's exit (seen through a pidfd) ends the call.
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    reason = None
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        exited = False
        while reason is None:
            # With a pidfd we do not reap here: the pid (== pgid) must stay ours until the group has been killed.
            if exited or (pidfd is None and proc.poll() is not None):
                # Drain what is already buffered in the pipes, without waiting for the background children.
                exited = True
                events = [(k, e) for k, e in sel.select(0) if k.fd in bufs]
                if not events or time.monotonic() > deadline:
                    break
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "timeout"
                    break
                # Without a pidfd, wake up now and then to poll() the main process.
                events = sel.select(remaining if pidfd is not None else min(remaining, 0.05))
            for key, _ in events:
                if key.fd == pidfd:
                    exited = True
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if len(bufs[key.fd]) > cap:
                    reason = "output_limit"
    if pidfd is not None:
        os.close(pidfd)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), reason


def _decode(data: bytes, cap: int) -> tuple[str, bool]:
    if len(data) <= cap:
        return data.decode("utf-8", errors="replace"), False
    return data[:cap].decode("utf-8", errors="replace") + TRUNCATION_MARKER.format(n=cap), True


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               max_output_bytes: int = 8192, max_file_mb: int = 16, max_procs: int = 16, max_open_files: int = 64,
               isolate_network: bool = True, drop_privileges: bool | None = None,
               seccomp: bool | None = None) -> SandboxResult:
    """Run `code` in a fresh limited interpreter (see the module docstring). Never raises for the code's faults.

    drop_privileges: None = when we are root (the only case where it is possible and needed).
    seccomp: None = when the launcher is built (`SECCOMP_LAUNCHER`) and works for the sandbox uid; True = required
    (RuntimeError when it is not there); False = never.
    """
    start = time.monotonic()
    if drop_privileges is None:
        drop_privileges = os.geteuid() == 0
    if drop_privileges and os.geteuid() != 0:
        raise PermissionError("drop_privileges=True needs root")
    pool = _get_uid_pool() if drop_privileges else None
    uid = pool.acquire() if pool else None
    tmp = tempfile.mkdtemp(prefix="flashchat-sandbox-")
    try:
        python2 = _pick_stage2_python(uid)
        launcher = _seccomp_launcher(uid, python2) if seccomp is not False else None
        if seccomp and launcher is None:
            raise RuntimeError(f"seccomp=True, but the launcher {SECCOMP_LAUNCHER} is not built or does not work "
                               f"here (cmake -S . -B build && cmake --build build --target fc_seccomp_exec)")
        if uid is not None:
            _kill_uid(uid, python2)  # leftovers of an earlier crashed run of ours, if any
            os.chown(tmp, uid, uid)  # the only directory the code owns
        code_path = os.path.join(tmp, "main.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(code_path, 0o644)
        # Not root: RLIMIT_NPROC counts every thread of our uid, the caller's included, so budget on top of those.
        nproc = max_procs if uid is not None else _threads_of_uid(os.getuid()) + max_procs
        cfg = {"cpu_s": int(cpu_s), "memory_mb": int(memory_mb), "max_file_mb": int(max_file_mb),
               "max_open_files": int(max_open_files), "nproc": int(nproc), "uid": uid,
               "isolate_network": bool(isolate_network), "python": python2, "stage2": _STAGE2,
               "code_path": "main.py", "launcher": launcher}  # code_path relative to the cwd: short tracebacks
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _STAGE1, json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
                                env=_minimal_env(tmp), start_new_session=True, close_fds=True)
        try:
            out, err, reason = _collect(proc, start + timeout_s, max_output_bytes)
        finally:
            # Kill the whole group even after a normal exit: nothing the code started may outlive the call.
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid thanks to start_new_session
            except (ProcessLookupError, PermissionError):
                pass
            if uid is not None:
                _kill_uid(uid, python2)  # children that left the group with setsid()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        _rmtree_force(tmp)
        if uid is not None:
            _remove_uid_leftovers(uid)
            pool.release(uid)
    rc = proc.returncode
    if reason is None and rc == _SETUP_FAILED_EXIT and err.startswith(b"sandbox setup failed"):
        reason = "sandbox_error"
    elif reason is None and rc is not None and rc < 0:
        sig = -rc
        # SIGXCPU is the soft CPU limit; SIGKILL that we did not send is the hard CPU limit (or the OOM killer).
        reason = "cpu_limit" if sig in (signal.SIGXCPU, signal.SIGKILL) else f"signal:{signal.Signals(sig).name}"
    stdout, t1 = _decode(out, max_output_bytes)
    stderr, t2 = _decode(err, max_output_bytes)
    return SandboxResult(stdout=stdout, stderr=stderr, exit_code=rc, timed_out=reason == "timeout",
                         killed_reason=reason, truncated=t1 or t2, wall_s=time.monotonic() - start,
                         seccomp=launcher is not None)


def calculator_program(code: str) -> str:
    """The program a tool call runs. A call that is one Python expression (GSM8K's calculator annotations "48/2",
    the synthetic tasks' "'strawberry'.count('r')") prints its value the way the training data shows tool outputs:
    no newline, and a float with an integral value as an integer ("24", not "24.0"). A print(...) call or any
    statement runs as written (a bare expression would otherwise print nothing: the sandbox returns stdout)."""
    text = code.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return code
    if isinstance(tree.body, ast.Call) and isinstance(tree.body.func, ast.Name) and tree.body.func.id == "print":
        return code
    # The newlines keep a trailing "# comment" of the call inside the parentheses.
    return f"_v = (\n{text}\n)\nprint(int(_v) if isinstance(_v, float) and _v.is_integer() else _v, end='')\n"


class ToolExecutor:
    """Runs sandbox calls on worker threads: `submit(code)` returns a Future[SandboxResult] at once. It is the
    engine's `tools`: every caller (CLI, server, chat evals, RL rollouts) runs model code the same way.

    Each call is its own process, so the threads only wait on pipes; `max_workers` bounds concurrent sandboxes
    (and must stay <= UID_POOL_SIZE as root, else calls queue on the uid pool). calculator: run single-expression
    calls through `calculator_program` (default; the chat format's tool calls are calculator expressions).
    """

    def __init__(self, max_workers: int = 4, calculator: bool = True, **limits):
        self.limits = limits  # keyword arguments of run_python, applied to every call
        self.calculator = calculator
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox")

    def submit(self, code: str, **overrides) -> Future:
        program = calculator_program(code) if self.calculator else code
        return self._pool.submit(run_python, program, **{**self.limits, **overrides})

    def run(self, code: str, **overrides) -> SandboxResult:
        return self.submit(code, **overrides).result()

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
