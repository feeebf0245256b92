"""The read side: queries, traces and overviews over a catalog file, in SQL. Never imports torch.

Modules are named by what they answer: runs (which run, notes, checks), edges, heads (one head),
overview (every head; two runs compared), trace (with graph, trace_heads, trace_seeded), browse
(the service's extra questions), export; fragments holds the SQL they share. catalog.read.query
gathers the query commands' Python twins in one namespace (see its docstring).
"""
