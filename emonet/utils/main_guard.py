"""The ``if __name__ == "__main__":`` guard, checked before a run starts worker processes.

Worker processes started with 'forkserver' or 'spawn' (the face-visibility pool, see
:func:`emonet.data.face_visibility.score_crops`) import the program's ``__main__``
module again, as ``__mp_main__``. A script that runs a flow at import time, outside the
guard, so runs the flow again in every worker: each starts its own Prefect API server and
pool, and the first pool breaks with a misleading "worker died". :func:`check_main_guard`
tells this apart before any worker starts, from the main thread's stack and the script's
source, and stops with a message that names the missing guard.
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
import threading
from pathlib import Path
from types import FrameType

__all__ = ["MissingMainGuardError", "check_main_guard"]


class MissingMainGuardError(RuntimeError):
    """The program's ``__main__`` script starts worker processes at import time, outside
    an ``if __name__ == "__main__":`` block."""


def _is_main_guard(node: ast.AST) -> bool:
    """Whether ``node`` is ``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    operands = [test.left, test.comparators[0]]
    names = [op for op in operands if isinstance(op, ast.Name) and op.id == "__name__"]
    mains = [op for op in operands if isinstance(op, ast.Constant) and op.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


def _guarded_lines(source: str) -> list[tuple[int, int]]:
    """The line ranges of the bodies of the module's top-level main guards."""
    tree = ast.parse(source)
    return [(node.body[0].lineno, node.end_lineno or node.lineno) for node in tree.body if _is_main_guard(node)]


def _main_module_frame(main_file: str) -> FrameType | None:
    """The frame running ``__main__``'s top-level code in the main thread, if it still runs."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    found = None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" and frame.f_globals.get("__name__") in ("__main__", "__mp_main__"):
            if Path(code.co_filename).resolve() == Path(main_file).resolve():
                found = frame
        frame = frame.f_back
    return found


def check_main_guard(what: str) -> None:
    """Stop, before any worker process starts, when the program's ``__main__`` script runs
    ``what`` (e.g. "the training flow") at import time, outside its main guard.

    Passes for an interactive session, ``python -c``, a notebook, a guarded script and
    ``python -m`` of a guarded module; and when the source cannot be read.

    Raises
    ------
    MissingMainGuardError
        Naming the script and the line that runs ``what``, and the fix.
    """
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if not main_file or not str(main_file).endswith(".py"):
        return
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A worker that is importing the script (multiprocessing's bootstrap): whatever
        # the script runs now runs outside its guard.
        raise MissingMainGuardError(_message(main_file, None, what))
    frame = _main_module_frame(main_file)
    if frame is None:
        return  # the script's top-level code has finished: nothing re-runs it
    try:
        guarded = _guarded_lines(Path(main_file).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    line = frame.f_lineno
    if not any(start <= line <= end for start, end in guarded):
        raise MissingMainGuardError(_message(main_file, line, what))


def _message(main_file: str, line: int | None, what: str) -> str:
    where = f"{main_file}, line {line}," if line is not None else main_file
    return (
        f'{where} runs {what} when the script is imported, outside an `if __name__ == "__main__":` block: '
        f"the worker processes import the script again and would run it again, each with its own Prefect "
        f'server. Put the call under `if __name__ == "__main__":` (stopped before any worker started)'
    )
