"""Machine description and Markdown formatting shared by the benchmarks."""

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys


def cpu_model():
    """The CPU model name from /proc/cpuinfo (or `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    """The SIMD extensions XNNPACK picks its kernels by, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    wanted = ("avx", "avx2", "fma", "avx512f", "avx512vnni")
                    return " ".join(w for w in wanted if w in present) or "-"
    except OSError:
        pass
    return "unknown"


def onednn_enabled():
    """Whether TensorFlow runs its CPU kernels through oneDNN: on by default
    only on CPUs with AVX-512 VNNI / BF16 or AMX (TF_ENABLE_ONEDNN_OPTS
    overrides), and 2-3x faster for these convolutions, with other
    round-off; so two "AMD EPYC" machines can differ in both."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average():
    try:
        return "%.2f, %.2f, %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    """A dict describing the machine, software versions and load."""
    onednn = {True: "on", False: "off"}.get(onednn_enabled(), "unknown")
    return {
        "CPU": f"{cpu_model()} ({cpu_flags()}; oneDNN {onednn})",
        "Cores": f"{os.cpu_count()} ({usable_cores()} usable)",
        "Python": platform.python_version(),
        "TensorFlow": package_version("tensorflow"),
        "Keras": package_version("keras"),
        "ai-edge-litert": package_version("ai-edge-litert"),
        "NumPy": package_version("numpy"),
        "Load average at start": load_average(),
        "Date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
    }


def run_header(**fields):
    """The first JSON line of a benchmark's raw results: the CPU model, its
    SIMD flags and whether oneDNN is on (runs on different CPUs diverge from
    the same seed, by other kernels and round-off, so results pair only
    within one CPU model and kernel set), the cores, the TensorFlow and
    Keras versions, then `fields`."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "cpu_flags": cpu_flags(), "onednn": onednn_enabled(),
            "tensorflow": package_version("tensorflow"),
            "keras": package_version("keras"), **fields}


def markdown_table(columns, rows):
    """Formats rows (sequences of cells) as an aligned Markdown table."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [
        max([len(columns[i])] + [len(r[i]) for r in rows])
        for i in range(len(columns))
    ]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in rows])


def command_line(argv=None):
    """The command that ran this script, shell-quoted."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python"] + [shlex.quote(a) for a in argv])


def set_threads(threads):
    """Runs TensorFlow ops on `threads` threads (intra- and inter-op).

    Both pools: with only the intra-op pool capped, independent ops still
    run side by side and the process uses more cores than asked for.
    0 keeps TensorFlow's defaults. Call before TensorFlow runs anything.
    """
    if threads:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
