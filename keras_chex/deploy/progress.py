"""Progress of a long export, one line per stage with its time."""

import contextlib
import time


class Stages:
    """Prints "[i/n] what ... 1.2 s" for each stage of an export."""

    def __init__(self, verbose, names):
        self.verbose = verbose
        self.names = names

    @contextlib.contextmanager
    def run(self, name, what):
        if not self.verbose or name not in self.names:
            yield
            return
        i = self.names.index(name) + 1
        print(f"[{i}/{len(self.names)}] {what} ...", end="", flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", flush=True)
            raise
        print(f" {time.perf_counter() - start:.1f} s", flush=True)
