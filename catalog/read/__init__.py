"""The read side: queries, traces and overviews over a catalog file, in SQL. Never imports torch."""
