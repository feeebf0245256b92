"""Ordered schema migrations (NNN_name.sql), applied by catalog.store.open_catalog."""
