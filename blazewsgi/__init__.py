"""BlazeWSGI: a pre-fork WSGI server whose hot path is C."""

__version__ = "0.1.0"
SERVER_SOFTWARE = f"BlazeWSGI/{__version__}"
