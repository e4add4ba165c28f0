"""A measured model of one hot round decided on several Redis Cluster primaries
(docs/scaling.md, "Design: one hot round over several primaries"): the Lua scripts of the
protocol (entitle, take, confirm, release, reap, cancel), its driver (protocol.py) and the
measurement ``python -m bench.spread`` (``make bench-spread``). Not wired into the service.
"""
