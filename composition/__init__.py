"""Composition: a request (model name, messages, sampling) turned into a plan (the name resolved, a
composition routed, its members and aggregator chosen) and run on the serving engines.

Above routers/, aggregators/ and merging/, below api/; serving/ holds the engines it runs on.
"""
