"""How spotfit compiles its kernels and runs them: numba's cache, the first-run notice, threads.

Every module with compiled kernels decorates them with :func:`njit` from here (not
numba's), which adds these things to ``numba.njit(cache=True, fastmath=False, ...)``
(``fastmath`` explicitly, so that a kernel never inherits its first caller's):

* **One cache key for all kernel modules.**  numba's on-disk cache checks only the
  source file that defines a function, so a kernel whose callee in another file
  changed was loaded stale (and a detection kernel once failed to load with
  ``No module named '<dynamic>'``).  Here every spotfit kernel's cache entry is
  stamped with a hash of the sources of all :data:`KERNEL_MODULES` (and numba's
  version): any change to any of them recompiles them all, once.  The cache stays
  where numba puts it: ``__pycache__`` beside the installed sources when that is
  writable (a ``pip install`` into a user's environment), else numba's user-wide
  cache folder, or ``NUMBA_CACHE_DIR`` when set.
* **A one-line notice** on standard error when a kernel is actually compiled
  (a cache miss), once per process, if the program asked for it
  (:func:`announce_compilation`; the command line does).
* **A second compiling process** on a first run, if the program asked for it
  (:func:`compile_alongside`; ``spotfit fit`` does): numba compiles one function
  at a time, so a second Python process compiles the covariance kernel
  (:func:`spotfit.solver.compile_covariance_kernel`; it computes the score statistic
  too) while this one compiles detection and the solver.  It starts at once when
  numba's cache beside the sources has no entry for that kernel (:func:`_cold`; the
  usual first run after ``pip install``), else at the first cache miss.  The model
  code both need is compiled by the second process first (this one loads it from the
  cache when its first fits need it).  Before calling the covariance kernel
  this process compiles the ``meanwhile`` kernels, if any, while the second is still
  running, then waits for it (:func:`join_alongside`) and loads the covariance kernel
  from the cache.  On two cores that takes about half off the compile time of a first
  run.
* **Less to compile** (what a first run compiles: ``benchmarks/compile_cost.py``):
  helpers with one caller are inlined at numba's IR level (``inline="always"``);
  kernels that only other kernels call are compiled without the wrappers that let
  Python call them (``@njit(inner=True)``); code that several kernels call (the model
  code) is a first-class function (:func:`first_class`), compiled once and called
  through its address instead of linked into each caller and compiled again there.
* **Loading without numba's context refresh** (:func:`_load_lightly`): a warm process
  loads each kernel it calls from the cache without first importing every typing and
  lowering implementation numba has (which only compiling needs).
* **Threads without ``parallel=True``** for the kernels that loop over windows:
  numba's parallel compilation costs 2-3 times the serial one (it was most of a
  first run's compile time), so they are compiled serially with ``nogil=True`` and
  run on a few Python threads, each over a contiguous range of windows
  (:func:`over_windows`); so do the row kernels of detection and background on
  frames of at least :data:`spotfit.filters.PARALLEL_PIXELS` pixels.  (The kernel
  of ``spotfit measure``, :mod:`spotfit._photometry_kernels`, still uses
  ``parallel=True``: it compiles on the first ``measure`` only.)

This module imports numba only when the first kernel is decorated, so that the
command line can ask for the notice without importing it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

#: the modules (files of this package) that define compiled kernels; their sources
#: together key the cache of every kernel (tests check that the list is complete)
KERNEL_MODULES = ("_kernels.py", "_photometry_kernels.py", "_csv.py", "background.py",
                  "detection.py", "filters.py", "group.py", "rendering.py")
#: the notice, printed once when the first kernel of a run is compiled (the time:
#: benchmarks/first_run.py on 2 cores, idle to busy)
NOTICE = "Compiling spotfit's kernels (once after installing or upgrading spotfit; 10-30 s)..."
#: options of every kernel unless it sets them.  ``fastmath`` explicitly: numba compiles
#: a kernel that does not set it with its first caller's (``_kernels.model_window``
#: called from the fastmath ``_pixel_costs`` or from ``covariance``, whichever compiled
#: first in the process), so the same code gave different bits after two first runs.
#: Part of the cache stamp (:func:`kernel_stamp`).
_DEFAULTS = {"cache": True, "fastmath": False}
#: fewer windows than this run in the calling thread
MIN_THREADED_WINDOWS = 64

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_DETACHED = []  # second compiling processes no longer waited for (kept referenced)
#: held by the thread that joins the second compiling process (:func:`join_alongside`)
_JOINING = threading.RLock()
_state = {"ready": False, "announce": False, "announced": False, "stamp": None,
          "alongside": None, "meanwhile": None, "helper": None, "joining": False}


def announce_compilation(on: bool = True) -> None:
    """Print :data:`NOTICE` on standard error when a kernel is compiled in this
    process, once; nothing when every kernel comes from the cache."""
    _state["announce"] = on


def compile_alongside(target, meanwhile=None, early=True) -> None:
    """At this process' first cache miss, start ``python -c "import M; M.F()"`` for
    ``target`` ``"M:F"`` (a function that compiles some kernels into the cache);
    ``None``: do not (any more; a process already started is left to finish filling
    the cache).  When numba's cache beside the sources (the usual place after ``pip
    install``) has no entry at all for the kernel that ``F`` is named after (``F`` is
    ``compile_<kernel>_kernel``), the process is started at once, without waiting for
    the first cache miss (which comes after this process' imports); ``early=False``:
    not before the first cache miss (e.g. when the input may be refused).

    ``meanwhile`` (``"M:F"``, optional): compiles some of the same kernels (those the
    second process compiles last); :func:`join_alongside` calls it in this process
    if the second process is still running, instead of waiting idle.  Whichever
    process finishes a kernel first puts it in the cache; the other loads it from
    there if it has not started it yet.
    """
    _state["alongside"] = target
    _state["meanwhile"] = meanwhile if target is not None else None
    if early and target is not None and _state["helper"] is None and not _state["announced"] \
            and _cold(target):
        _start_helper(target)  # now rather than at the first cache miss: a second earlier
    if target is None and _state["helper"] is not None:
        _DETACHED.append(_state["helper"])
        _state["helper"] = None


def join_alongside(timeout: float = 600.0) -> None:
    """Wait for the process :func:`compile_alongside` started, if any (then load
    what it compiled from the cache instead of compiling it again); while it runs,
    compile its ``meanwhile`` kernels here."""
    if _state["helper"] is None:
        return
    with _JOINING:  # threads that need the kernel meanwhile wait for the one joining
        _join(timeout)


def _join(timeout):
    helper = _state["helper"]
    if helper is None or _state["joining"]:  # (the meanwhile function calls this too)
        return
    meanwhile, _state["meanwhile"] = _state["meanwhile"], None
    if meanwhile is not None and helper.poll() is None:
        _state["joining"] = True
        try:
            _call(meanwhile)
        finally:
            _state["joining"] = False
    import subprocess

    try:
        helper.wait(timeout)
    except subprocess.TimeoutExpired:  # compile here after all
        helper.kill()
        helper.wait()
    finally:  # (only now: a thread that finds it None needs not wait)
        _state["helper"] = None


def njit(*args, **options):
    """``numba.njit`` with ``cache=True`` and spotfit's cache key (see the module docstring).

    Use as ``@njit`` or ``@njit(error_model="numpy", nogil=True)``.

    ``inner=True``: a kernel that only other kernels call, compiled without the
    wrappers that would let Python call it (they cost compile time only).
    """
    _setup()
    from numba import njit as numba_njit

    for name, value in _DEFAULTS.items():
        options.setdefault(name, value)
    if options.pop("inner", False):
        options.update(no_cpython_wrapper=True, no_cfunc_wrapper=True)
    if args and callable(args[0]):
        return _load_lightly(numba_njit(**options)(args[0]))
    decorate = numba_njit(*args, **options)
    return lambda func: _load_lightly(decorate(func))


def first_class(dispatcher, signature):
    """``dispatcher`` (a kernel compiled with its C wrapper, i.e. not ``inner=True``) as a
    first-class function of one signature (``signature()``: a numba signature, built on
    first use): pass it to kernels as an argument and call it there.

    A kernel calling another one by name links in the callee's code, then optimises it
    again and compiles it to machine code again with its own: on a first run every
    kernel pays again for the model code it calls.  A first-class function is called
    through its address (numba's ``FunctionType``; one indirect call, which the callee's
    work per call should dwarf), so its code is compiled once, cached as any kernel.
    The address is looked up when a kernel is first called with it (compiling
    ``dispatcher`` for the signature, or loading it from the cache).  The signature's
    arrays must be of exactly the types the callers pass (layout, dtype, writeable).
    """
    from numba.core.types import WrapperAddressProtocol
    from numba.core.typing.typeof import typeof_impl
    from numba.experimental.function_type import typeof_function_type  # (numba's typing of such objects)

    lock = threading.Lock()

    class FirstClass(WrapperAddressProtocol):
        _signature = None
        _address = None

        def signature(self):
            if self._signature is None:
                self._signature = signature()
            return self._signature

        def compile(self):
            """Compile the function (or load it from the cache) now; its address."""
            return self.__wrapper_address__()

        def __wrapper_address__(self):
            if self._address is None:
                with lock:
                    if self._address is None:
                        args = self.signature().args
                        dispatcher.compile(args)
                        result = dispatcher.overloads[args]
                        self._address = result.library.get_pointer_to_function(
                            result.fndesc.llvm_cfunc_wrapper_name)
            return self._address

        def __repr__(self):
            return f"first_class({dispatcher.py_func.__qualname__})"

    # numba types an argument it has no fast path for in Python on every call of a
    # kernel (its typeof, then FunctionType(signature)): ~20 us per call with the model's
    # function (~80 calls per 2048 x 2048 frame, more in dense fields); the type is the
    # same every time, so it is kept here
    typed = []

    @typeof_impl.register(FirstClass)
    def _typeof(value, context):
        if not typed:
            typed.append(typeof_function_type(value, context))
        return typed[0]

    return FirstClass()


def over_windows(kernel, n: int, *args, threaded=None) -> None:
    """Call ``kernel(*args, start, stop)`` over items ``0 .. n`` (windows, rows of
    pixels) split into ranges.

    The ranges run on :func:`kernel_threads` threads (numba's number of threads,
    which :meth:`spotfit.config.FitConfig.use_threads` sets), a few ranges per thread
    to balance the load; the kernel must be compiled with ``nogil=True`` and write
    each item's results only.  ``threaded``: whether to use threads at all (waking
    them costs more than a small frame's work); default: from
    :data:`MIN_THREADED_WINDOWS` windows on.  ``kernel`` may be a Python function
    (e.g. one running NumPy on strips of an array); a call made from inside one of
    its ranges runs in that range's thread.  The threads are kept between calls
    (:func:`_pool`): a dense field makes hundreds of small calls, and starting two
    threads per call cost more than some of the calls' work.
    """
    threads = kernel_threads()
    if threaded is None:
        threaded = n >= MIN_THREADED_WINDOWS
    if threads <= 1 or not threaded or n < 2 or getattr(_WORKING, "on", False):
        # (a call from inside a range runs in its thread: the others are busy, and
        # a pool worker waiting on its own pool would never return)
        kernel(*args, 0, n)
        return
    chunks = min(4 * threads, n)
    bounds = [(c * n // chunks, (c + 1) * n // chunks) for c in range(chunks)]
    pending = iter(bounds)
    lock = threading.Lock()

    def work():
        _WORKING.on = True
        try:
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                kernel(*args, *item)
        finally:
            _WORKING.on = False

    # the calling thread works through the ranges too instead of waiting idle
    futures = [_pool(threads).submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for done in futures:
            done.result()


_POOL = {"pool": None, "threads": 0, "pid": None}
_THREADS = threading.local()  # set_kernel_threads' count while numba's threads are not running


def set_kernel_threads(n: int) -> None:
    """``numba.set_num_threads(n)`` (capped to numba's maximum) for :func:`over_windows`,
    without launching numba's own thread pool when it is not running yet.

    spotfit's fit kernels do not run on numba's threads (see the module docstring),
    and launching them (the threading layer's library, its threads) costs a fresh
    process ~30 ms: the count is kept here, per Python thread as numba keeps
    it, until something launches numba's threads (``numba.set_num_threads``
    or ``get_num_threads``, a ``parallel=True`` kernel); from then on numba's
    count is the one used.
    """
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    if _numba_threads_running():
        numba.set_num_threads(n)
        _THREADS.count = None
    else:
        _THREADS.count = n


def kernel_threads() -> int:
    """The number of threads :func:`over_windows` uses: ``numba.get_num_threads()``
    once numba's threads run; before, :func:`set_kernel_threads`' count, or
    numba's default (``numba.config.NUMBA_NUM_THREADS``, what ``get_num_threads``
    would return after launching them)."""
    import numba

    if _numba_threads_running():
        return numba.get_num_threads()
    count = getattr(_THREADS, "count", None)
    return numba.config.NUMBA_NUM_THREADS if count is None else count


def _numba_threads_running() -> bool:
    """Whether numba has launched its threads (True when unsure)."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return True if parallel is None else bool(getattr(parallel, "_is_initialized", True))

_WORKING = threading.local()  # .on: this thread runs a range of over_windows


def _pool(threads: int):
    """A thread pool of ``threads - 1`` workers (the caller is the last one), kept
    between calls; a new one after the thread count changed or in a new process."""
    from concurrent.futures import ThreadPoolExecutor

    if _POOL["pool"] is None or _POOL["threads"] != threads or _POOL["pid"] != os.getpid():
        old = _POOL["pool"]
        if old is not None and _POOL["pid"] == os.getpid():
            old.shutdown(wait=False)
        _POOL.update(pool=ThreadPoolExecutor(max_workers=max(threads - 1, 1),
                                             thread_name_prefix="spotfit-kernel"),
                     threads=threads, pid=os.getpid())
    return _POOL["pool"]


def kernel_stamp(package=None, numba_version=None) -> str:
    """Hash of the sources of all :data:`KERNEL_MODULES` (in the folder ``package``,
    default: this package's) and numba's version (``numba_version``, default: the
    imported numba's)."""
    if package is not None:
        if numba_version is None:
            import numba

            numba_version = numba.__version__
        digest = hashlib.sha256(numba_version.encode())
        digest.update(repr(sorted(_DEFAULTS.items())).encode())
        for name in KERNEL_MODULES:
            with open(os.path.join(package, name), "rb") as f:
                digest.update(f.read())
        return digest.hexdigest()
    if _state["stamp"] is None:
        _state["stamp"] = kernel_stamp(_PACKAGE)
    return _state["stamp"]


def _setup() -> None:
    """Install the cache locators and the compile listener (once)."""
    if _state["ready"]:
        return
    from numba.core import caching
    from numba.core import event

    bases = [getattr(caching, name, None) or getattr(caching, "_" + name)
             for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    ours = [_locator(base) for base in bases]
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in numba 0.61
    classes = impl._locator_classes
    classes[:0] = [cls for cls in ours if cls.__name__ not in {c.__name__ for c in classes}]

    class Listener(event.Listener):
        def on_start(self, ev):
            _on_compile_start(ev)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Listener())
    _state["ready"] = True


def _cold(target: str) -> bool:
    """Whether numba's cache beside the sources surely lacks the kernel ``target``
    (``"M:compile_<kernel>_kernel"``, the kernel defined in :mod:`spotfit._kernels`)
    compiles: no index file for it, or only ones older than ``_kernels.py`` that were
    not written for these sources (:func:`_written_for`; False when unsure: another
    cache folder is used, or the name does not say)."""
    func = target.split(":")[-1]
    if os.environ.get("NUMBA_CACHE_DIR") or not (func.startswith("compile_") and func.endswith("_kernel")):
        return False
    kernel = func[len("compile_"):-len("_kernel")]
    cache = os.path.join(_PACKAGE, "__pycache__")
    if not os.access(cache if os.path.isdir(cache) else _PACKAGE, os.W_OK):
        return False  # numba would use its user-wide folder
    try:
        entries = [os.path.join(cache, name) for name in os.listdir(cache)
                   if name.startswith(f"_kernels.{kernel}-") and name.endswith(".nbi")]
        source = os.path.getmtime(os.path.join(_PACKAGE, "_kernels.py"))
        if any(os.path.getmtime(entry) >= source for entry in entries):
            return False
    except OSError:  # no cache folder yet
        return True
    # entries older than the sources: left by a previous version (pip leaves them), or
    # written for these very sources, which a reinstall or a checkout dated again
    return not _written_for(entries)


def _written_for(entries) -> bool:
    """Whether one of the index files ``entries`` holds the stamp of this package's
    sources (:func:`kernel_stamp`; numba pickles it as text into the index, so its
    bytes are found in the file), computed without importing numba (its version from
    the installed distribution's metadata when numba is not imported yet)."""
    if not entries:
        return False
    try:
        numba = sys.modules.get("numba")
        if numba is not None:
            version = numba.__version__
        else:
            from importlib import metadata

            version = metadata.version("numba")
        stamp = kernel_stamp(_PACKAGE, version).encode()
        for entry in entries:
            with open(entry, "rb") as f:
                if stamp in f.read():
                    return True
    except (OSError, ImportError, ValueError):  # (metadata.PackageNotFoundError is an ImportError)
        pass
    return False


def _call(target: str) -> None:
    """Call the function ``"M:F"``."""
    import importlib

    module, func = target.split(":")
    getattr(importlib.import_module(module), func)()


def _start_helper(target: str) -> None:
    import subprocess

    module, func = target.split(":")
    # the same spotfit as this process' (not one in the working directory)
    code = (f"import sys; sys.path[0] = {os.path.dirname(_PACKAGE)!r}; "
            f"import {module}; {module}.{func}()")
    try:
        _state["helper"] = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # no second process: compile everything here
        _state["helper"] = None


def _load_lightly(dispatcher):
    """Make ``dispatcher`` (a cached kernel) load its cache entries without numba's
    ``refresh`` of the target context; the dispatcher.

    numba's ``Cache.load_overload`` first refreshes the context: it imports and
    registers every typing and lowering implementation numba has (``numba.np.arraymath``
    imports ``scipy.linalg`` to check for BLAS), which only compiling needs; in a
    fresh process with a warm cache that was most of numba's start-up (0.3-0.7 s of a
    small fit).  Running a cached kernel needs the symbols its machine code calls, and
    :func:`_ready_to_load` registers all those the refresh would have (numba's runtime
    and the hash secret; the C helpers and the math library are registered when the
    context is made; a parallel kernel's threads are started by its entry's
    ``reload_init``).  A compilation still refreshes the context itself.
    """
    cache = getattr(dispatcher, "_cache", None)
    if not (callable(getattr(cache, "_load_overload", None))
            and callable(getattr(cache, "_guard_against_spurious_io_errors", None))):
        return dispatcher  # not a cached kernel, or another numba: its own load_overload

    def load_overload(sig, target_context):
        if not _ready_to_load(target_context):
            return type(cache).load_overload(cache, sig, target_context)
        with cache._guard_against_spurious_io_errors():
            return cache._load_overload(sig, target_context)

    cache.load_overload = load_overload
    return dispatcher


#: numba versions (prefixes) whose cached kernels were checked to link only to what
#: :func:`_ready_to_load` registers (``nm -u`` over every cached object of the test
#: suite's runs): machine code that called a symbol nobody registered would crash the
#: process, so other versions load the way numba does (the context refreshed first)
LIGHT_LOAD_NUMBA = ("0.68.",)


def light_load_verified() -> bool:
    """Whether the installed numba is one of :data:`LIGHT_LOAD_NUMBA`."""
    import numba

    return numba.__version__.startswith(LIGHT_LOAD_NUMBA)


def _ready_to_load(target_context) -> bool:
    """Register what cached kernels' machine code links to (once per context); False
    if this numba is not a version checked for it (:data:`LIGHT_LOAD_NUMBA`) or does not
    have what that needs (then its own refresh does it)."""
    ready = _state.setdefault("loadable", {})
    key = id(target_context)
    if key not in ready and not light_load_verified():
        ready[key] = False
    if key not in ready:
        try:
            import numba.cpython.hashing  # noqa: F401  (registers the hash secret's symbols)
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)  # numba's runtime (NRT_*): allocation, refcounts
            ready[key] = True
        except (ImportError, AttributeError):
            ready[key] = False
    return ready[key]


def _locator(base):
    """A subclass of numba's cache locator ``base`` for spotfit's files, stamped by
    :func:`kernel_stamp` instead of the one file's source."""

    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _PACKAGE:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return kernel_stamp()

    Locator.__name__ = Locator.__qualname__ = "Spotfit" + base.__name__.lstrip("_")
    return Locator


def _on_compile_start(event) -> None:
    """Print the notice at the start of the first compilation of a spotfit kernel."""
    if _state["announced"] or not (_state["announce"] or _state["alongside"]):
        return
    func = getattr(event.data.get("dispatcher"), "py_func", None)
    if func is None or not getattr(func, "__module__", "").startswith("spotfit."):
        return
    _state["announced"] = True
    if _state["alongside"] and _state["helper"] is None:
        _start_helper(_state["alongside"])
    if not _state["announce"]:
        return
    stream = sys.stderr
    clear = "\r\x1b[K" if getattr(stream, "isatty", lambda: False)() else ""  # over a progress bar's line, if any
    print(clear + NOTICE, file=stream, flush=True)
