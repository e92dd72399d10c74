"""Global (query-level) routers: which experts answer a query. (`global` is a Python keyword.)"""
