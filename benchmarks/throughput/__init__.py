"""``python -m benchmarks.bench_throughput``, by part: the service against its own floor.

The entry point (:mod:`benchmarks.bench_throughput`) holds the command line and its help; the
parts it runs live here, one module each, so that a part can be read, changed or reused (by
another benchmark or a profiling script) without the 1 600 lines around it:

* :mod:`.common`: the checkout's root, the stage names, the error that ends a run, percentiles, printing;
* :mod:`.inputs`: the input kinds, their template files and the distinct copies dropped;
* :mod:`.floor`: the runtime's own stage functions with no service around them (the floor);
* :mod:`.services`: the broker, the service in this process and as a subprocess, a subscriber;
* :mod:`.memory`: RSS, PSS and VmHWM of a process tree, sampled over time;
* :mod:`.profiling`: py-spy around a drop into the subprocess service, and its summary;
* :mod:`.measure`: parts (a) to (e), each returning its numbers;
* :mod:`.report`: the tables and the targets of issue #16, MET or MISSED;
* :mod:`.plot`: the figure (matplotlib, optional);
* :mod:`.run`: one run from parsed arguments: set-up, the parts, the report, the JSON file.
"""
