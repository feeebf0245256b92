"""Output formats: tables for the terminal, CSV and JSON (`table`), circuit drawings (`graph`)."""
