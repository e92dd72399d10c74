"""Jobs: every long task (a merge, training an expert, fitting a composition's router) is a row of the jobs
table (``registry/jobs.py``) run by a worker (``jobs/worker.py``), off the request that asked for it.

Above composition/, merging/ and registry/, below api/: a kind's handler (``merge.py``, ``train.py``,
``fit.py``) does the work with those packages; the worker claims, leases, beats, cancels and recovers.
"""
