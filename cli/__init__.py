"""The ``vismem`` command line: one module per verb group over the library's typed functions."""
