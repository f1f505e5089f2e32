"""The stages of ``benchmarks/gpu_suite.py`` (the command line and its documentation are there).

``config.py`` names the stages, their budgets and the paths; ``suite.py`` runs a stage within its budget and keeps
``results.json``; one module per stage (``env``, ``kernel_tests``, ``kernel_speed``, ``sd3``, ``flux`` with the step
timing they share in ``step_bench``, ``tensorrt``, and ``on_device`` for the stacks, memory and context-parallel
checks of ``tests/support``); ``readme.py`` renders the README from ``results.json``. The models, inputs, captured
graphs, timings and memory measurements are ``rascompile.bench``'s, with a device and a dtype.

Importing rascompile imports Triton (through ``torch._dynamo``), which reads ``TRITON_INTERPRET`` then: the modules
that do (``kernel_speed``, ``sd3``, ``flux``, ``tensorrt``, ``step_bench``) are imported only when their stage runs
(``gpu_suite.imported_when_run``); the others import rascompile inside their functions, if at all.
"""
