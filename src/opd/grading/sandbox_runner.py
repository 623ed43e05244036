"""The runner: the first Python code inside the sandbox. It splits into two processes before anything is
read, so that the tests and the proof of their completion live in a process the program cannot touch.

`sandbox_launcher.py` starts it as `python -I -S -B -c <this file's text> <setup fd> <proof fd> <program.py>`;
it is never imported inside the sandbox (the checkout may be hidden there), but the parent imports it to test the codec.

1. It makes itself non-dumpable (a process of the same uid may then neither ptrace it nor open its
   /proc/<pid>/mem or /proc/<pid>/fd; the program has no capability, and the seccomp filter refuses ptrace,
   process_vm_readv/writev and pidfd_getfd besides), opens two pipes and forks, before it has read anything.
2. The child is the *program process*: it closes the setup and proof descriptors at once (before any
   program code runs, and before they were ever read, so neither the tests nor the token were ever in its
   memory), reads the program from program.py, runs it as `__main__`, then answers requests from the tests:
   call an object, read or set an attribute, iterate. It sends back only plain data (exact builtin scalars and
   containers; a subclass is read through its base type's C methods, so `class Evil(int)` becomes its int)
   and, for anything else, a numbered handle to an object that stays in the program process.
3. The parent is the *test process*: it reads the tests and the token from the setup descriptor, waits
   for the program to finish, binds every top-level name the program defined (a plain value, a handle, or
   a standard-library module re-imported here) and runs the tests in its own interpreter, with builtins no
   program code ever saw. Only when the tests return, no request failed because the program process had
   ended, it flushes its output, writes the token to the proof descriptor and exits 0.
Any exit of the program before the tests' end (sys.exit, os._exit, atexit, excepthook, a signal handler)
ends the program process; the test process then exits with the program's status and without the token.

What crosses between them: the test process decodes the program's replies with a strict decoder (JSON, then
only the tags below; never pickle), so a reply is plain data or a handle. A handle (`RemoteObject`) is equal
only to itself, has no truth value, no order and no length: an object of the program's own class is never
equal to plain data, and `assert candidate(x)` with such a result fails. Its attributes, calls and
iteration are requests to the program process. Arguments go the other way as plain data or handles; a
test that passes one of its own functions, or that relies on the program mutating an argument in place,
cannot be run this way (none of HumanEval's or MBPP's does; the test then fails, never passes).
"""

import builtins
import collections
import json
import os
import sys

# Tags of the wire format: every non-scalar value is a one-key JSON object.
_SEQUENCES = {"l": list, "t": tuple, "s": set, "f": frozenset, "q": collections.deque}
_NO_REIMPORT = frozenset({"antigravity", "this", "__main__"})  # standard modules with side effects on import
_MAX_MESSAGE = 1 << 28
_MAX_DEPTH = 200


def main():
    setup_fd, proof_fd, program_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _no_dumping()
    calls_read, calls_write = os.pipe()
    replies_read, replies_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(setup_fd)
        os.close(proof_fd)
        os.close(calls_write)
        os.close(replies_read)
        _program_process(program_path, calls_read, replies_write)
    os.close(calls_read)
    os.close(replies_write)
    _test_process(setup_fd, proof_fd, _Channel(calls_write, replies_read), child)


def _no_dumping() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        os._exit(125)


# ------------------------------------------------------------------------------------ the test process

class ProgramError(Exception):
    """An exception the program raised, of a type that is not one of Python's built-in exceptions."""


class ProgramEnded(BaseException):
    """The program process ended during a request: no test can pass after this."""


class RemoteObject:
    """A handle to an object in the program process: equal only to itself, with no truth value."""

    __slots__ = ("_channel", "_number", "_type")

    def __init__(self, channel, number: int, type_name: str):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_number", number)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args, **kwargs):
        return self._channel.request({"call": self._number, "args": [_encode(a) for a in args],
                                      "kwargs": [[k, _encode(v)] for k, v in kwargs.items()]})

    def __getattr__(self, name):
        return self._channel.request({"getattr": self._number, "name": name})

    def __setattr__(self, name, value):  # MBPP's setup code builds trees: `root.left = Node(2)`
        self._channel.request({"setattr": self._number, "name": name, "value": _encode(value)})

    def __iter__(self):
        iterator = self._channel.request({"iter": self._number})
        if type(iterator) is not RemoteObject:  # the program's __iter__ returned plain data
            raise TypeError(f"iter() of a {self._type} returned a non-iterator")
        return _RemoteIterator(iterator)

    def __bool__(self):
        raise TypeError(f"the tests take the truth of an object that is not plain data: {self._type}")

    def __lt__(self, other):
        raise TypeError(f"the tests order an object that is not plain data: {self._type}")

    __le__ = __gt__ = __ge__ = __lt__
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def __repr__(self):
        return f"<{self._type} object of the program>"


class _RemoteIterator:
    __slots__ = ("_remote",)

    def __init__(self, remote: RemoteObject):
        self._remote = remote

    def __iter__(self):
        return self

    def __next__(self):
        return self._remote._channel.request({"next": self._remote._number})


class _Channel:
    """Length-prefixed JSON messages to and from the program process; the replies are decoded strictly."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd, self.ended = write_fd, read_fd, False

    def receive(self):
        header = _read_exactly(self.read_fd, 8)
        size = int.from_bytes(header, "big") if header is not None else 0
        body = _read_exactly(self.read_fd, size) if header is not None and size <= _MAX_MESSAGE else None
        if body is None:
            self.ended = True
            raise ProgramEnded("the program process ended")
        return json.loads(body)

    def request(self, message: dict):
        if self.ended:
            raise ProgramEnded("the program process ended")
        try:
            _send(self.write_fd, message)
        except OSError:
            self.ended = True
            raise ProgramEnded("the program process ended") from None
        reply = self.receive()
        if type(reply) is not dict or len(reply) != 1:
            raise ValueError("a malformed reply from the program process")
        if "value" in reply:
            return _decode(reply["value"], self, 0)
        failure = reply.get("raise")
        if type(failure) is not list or len(failure) != 2 or not all(type(part) is str for part in failure):
            raise ValueError("a malformed reply from the program process")
        raise _exception(*failure)


def _exception(type_name: str, message: str) -> BaseException:
    kind = getattr(builtins, type_name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):  # ValueError stays a ValueError for the tests
        return kind(message)
    return ProgramError(f"{type_name}: {message}")


def _decode(data, channel, depth: int):
    """A reply's value as plain data or handles; anything that is not exactly the wire format is refused."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is not dict or len(data) != 1 or depth > _MAX_DEPTH:
        raise ValueError("a malformed value from the program process")
    (tag, body), = data.items()
    if tag in _SEQUENCES and type(body) is list:
        return _SEQUENCES[tag](_decode(item, channel, depth + 1) for item in body)
    if tag == "d" and type(body) is list and all(type(pair) is list and len(pair) == 2 for pair in body):
        return {_decode(key, channel, depth + 1): _decode(value, channel, depth + 1) for key, value in body}
    if tag in ("b", "y") and type(body) is str:
        return (bytes if tag == "b" else bytearray).fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(part) in (int, float) for part in body):
        return complex(*body)
    if tag == "r" and type(body) is list and len(body) == 2 and type(body[0]) is int and type(body[1]) is str:
        return RemoteObject(channel, body[0], body[1][:200])
    if tag == "m" and type(body) is str and body.split(".")[0] in sys.stdlib_module_names \
            and body.split(".")[0] not in _NO_REIMPORT:
        import importlib

        return importlib.import_module(body)  # our own copy: a module the program patched stays unpatched
    raise ValueError("a malformed value from the program process")


def _encode(value, depth: int = 0):
    """An argument from the tests (plain data or a handle) in the wire format."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is RemoteObject:
        return {"r": [value._number, value._type]}
    if depth > _MAX_DEPTH:
        raise ValueError("an argument nested too deeply to pass to the program")
    for tag, sequence in _SEQUENCES.items():
        if kind is sequence:
            return {tag: [_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"d": [[_encode(key, depth + 1), _encode(item, depth + 1)] for key, item in value.items()]}
    if kind in (bytes, bytearray):
        return {"b" if kind is bytes else "y": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    raise TypeError(f"the tests pass a {kind.__name__} to the program: only plain data and the program's "
                    "own objects can cross into the program process")


def _test_process(setup_fd: int, proof_fd: int, channel: _Channel, child: int) -> None:
    chunks = []
    while chunk := os.read(setup_fd, 1 << 20):
        chunks.append(chunk)
    os.close(setup_fd)
    setup = json.loads(b"".join(chunks))
    token, tests = setup["token"].encode(), setup["tests"]
    del chunks, setup
    sys.set_int_max_str_digits(0)
    scope = {"__name__": "__tests__", "__builtins__": builtins}
    try:
        names = channel.receive()  # the program ran to its end: its top-level names
        if type(names) is not dict or type(names.get("names")) is not list:
            raise ValueError("a malformed message from the program process")
        for pair in names["names"]:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise ValueError("a malformed message from the program process")
            scope[pair[0]] = _decode(pair[1], channel, 0)
        if tests.strip():
            exec(compile(tests, "<tests>", "exec", dont_inherit=True), scope)
    except ProgramEnded:
        _leave_as_program(child)
    except BaseException as error:
        _print_error(error)
        _flush()
        os._exit(1)
    if channel.ended:  # the tests swallowed a ProgramEnded (a bare `except:`): the program did not finish them
        _leave_as_program(child)
    _flush()
    os.write(proof_fd, token)
    os._exit(0)


def _leave_as_program(child: int) -> None:
    """Exit with the program's own status (so the parent reports "exit code 0 before the tests ran to
    their end"), never with the token."""
    _flush()
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _print_error(error: BaseException) -> None:
    import traceback

    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # the runner's own frames
        tb = tb.tb_next
    traceback.print_exception(type(error), error, tb)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = os.read(fd, min(size - len(data), 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _send(fd: int, message) -> None:
    body = json.dumps(message).encode()
    data = len(body).to_bytes(8, "big") + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --------------------------------------------------------------------------------- the program process

def _program_process(path: str, calls_fd: int, replies_fd: int) -> None:
    import types

    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    sys.set_int_max_str_digits(0)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    handles = []
    try:
        exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)
        del source
        names = [[name, _export(value, handles)] for name, value in list(module.__dict__.items())
                 if not name.startswith("__")]
    except SystemExit:
        raise  # an exit before the end (of any status): the test process sees it and never writes the token
    except BaseException as error:
        _print_error(error)
        _flush()
        os._exit(1)
    _flush()  # the test process's exit ends this process at once: its output must be out before
    _send(replies_fd, {"names": names})
    _serve(calls_fd, replies_fd, handles)


def _serve(calls_fd: int, replies_fd: int, handles: list) -> None:
    while True:
        header = _read_exactly(calls_fd, 8)
        if header is None:
            _flush()
            os._exit(0)
        request = json.loads(_read_exactly(calls_fd, int.from_bytes(header, "big")) or b"null")
        try:
            reply = {"value": _export(_answer(request, handles), handles)}
        except SystemExit:
            raise
        except BaseException as error:
            reply = {"raise": [type(error).__name__, _message(error)]}
        _flush()
        _send(replies_fd, reply)


def _answer(request: dict, handles: list):
    if "call" in request:
        args = [_import(item, handles) for item in request["args"]]
        kwargs = {key: _import(item, handles) for key, item in request["kwargs"]}
        return handles[request["call"]](*args, **kwargs)
    if "getattr" in request:
        return getattr(handles[request["getattr"]], request["name"])
    if "setattr" in request:
        return setattr(handles[request["setattr"]], request["name"], _import(request["value"], handles))
    if "iter" in request:
        return iter(handles[request["iter"]])
    return next(handles[request["next"]])


def _message(error: BaseException) -> str:
    try:
        return str(error)[:2000]
    except BaseException:
        return "(an exception whose message could not be read)"


def _import(data, handles: list):
    """An argument from the tests (trusted wire format) as a value of the program process."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    (tag, body), = data.items()
    if tag in _SEQUENCES:
        return _SEQUENCES[tag](_import(item, handles) for item in body)
    if tag == "d":
        return {_import(key, handles): _import(value, handles) for key, value in body}
    if tag in ("b", "y"):
        return (bytes if tag == "b" else bytearray).fromhex(body)
    if tag == "c":
        return complex(*body)
    return handles[body[0]]


_CONVERT = {int: int.__int__, float: float.__float__, complex: complex.__complex__, str: str.__str__,
            bytes: bytes.__bytes__}


def _export(value, handles: list, depth: int = 0):
    """`value` in the wire format: plain data read by C methods (a subclass by its base's value), a
    standard module by name, anything else as a handle."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    try:
        if depth <= _MAX_DEPTH:
            plain = _export_plain(value, kind, handles, depth)
            if plain is not None:
                return plain
        if kind is type(sys) and value.__name__.split(".")[0] in sys.stdlib_module_names:
            return {"m": value.__name__}
    except Exception:  # a type that lies about its base (a metaclass's mro(), a __class__ property)
        pass
    handles.append(value)
    return {"r": [len(handles) - 1, _type_name(kind)]}


def _export_plain(value, kind, handles: list, depth: int):
    for tag, sequence in _SEQUENCES.items():
        if kind is sequence:
            return {tag: [_export(item, handles, depth + 1) for item in sequence.__iter__(value)]}
    if kind is dict:
        return {"d": [[_export(k, handles, depth + 1), _export(v, handles, depth + 1)] for k, v in dict.items(value)]}
    if kind is bytes or kind is bytearray:
        return {"b" if kind is bytes else "y": bytes.hex(value) if kind is bytes else bytearray.hex(value)}
    if kind is complex:
        return {"c": [complex.__getattribute__(value, "real"), complex.__getattribute__(value, "imag")]}
    for base, convert in _CONVERT.items():  # a Counter, a namedtuple, a program's `class Evil(int)`
        if issubclass(kind, base):
            return _export(convert(value), handles, depth + 1)
    for tag, sequence in _SEQUENCES.items():
        if issubclass(kind, sequence):
            return {tag: [_export(item, handles, depth + 1) for item in sequence.__iter__(value)]}
    if issubclass(kind, dict):
        return {"d": [[_export(k, handles, depth + 1), _export(v, handles, depth + 1)] for k, v in dict.items(value)]}
    return None


def _type_name(kind) -> str:
    try:
        return str(type.__getattribute__(kind, "__name__"))[:200]
    except BaseException:
        return "object"


if __name__ == "__main__":
    main()
