"""The release gate: a locust flash crowd against allot, then conservation checks.

``allot loadtest`` (``loadtest.runner``) starts or targets a service, runs the crowd of
``loadtest/locustfile.py`` with locust, and checks afterwards that nothing was oversold, lost or
given twice. ``loadtest.crowd`` holds what the locustfile and the runner share (identities, body
checks, the record format); it imports neither locust nor gevent.
"""
