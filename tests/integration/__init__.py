"""Integration tests: real broker and worker processes started through the real entry points.

A package (``integration.test_*``) so that test modules may share basenames
with tests/unit, and so that workers, which have tests/ on their path, can
import functions and classes defined in these modules by reference.
"""
