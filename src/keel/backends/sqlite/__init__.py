"""The embedded SQLite engine: one file, several processes on one machine."""
