"""The embedded default: the whole service on one machine from one command (`python -m embedded`).

`processes` starts and stops redis-server, a worker and the API as child processes; the test suite
uses the same helpers, so what the quick start runs is what CI checks.
"""
