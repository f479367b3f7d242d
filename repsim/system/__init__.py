"""Plumbing shared by every layer: the user-error type, devices and dtypes, atomic files and output folders, threads."""
