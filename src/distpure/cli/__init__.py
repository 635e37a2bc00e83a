"""The ``distpure`` command line."""
