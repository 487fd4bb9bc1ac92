"""Import the WSGI application named by wsgi_path.

Two forms:
  * a file, ``/srv/mysite/mysite/wsgi.py[:callable]``.  If its directory is
    a package (has __init__.py), the first directory above it that is not
    a package is the project root: it goes on sys.path and the file is
    imported by its dotted name (``mysite.wsgi``), so Django's
    ``DJANGO_SETTINGS_MODULE = "mysite.settings"`` imports.  Otherwise the
    file's own directory goes on sys.path.
  * a module, ``package.module[:callable]``, imported from sys.path (the
    working directory is on it, as with gunicorn).
The callable defaults to ``application``.
"""
import importlib
import os
import re
import sys


class AppImportError(Exception):
    """The application could not be imported or is not callable."""


def split_app(spec):
    m = re.fullmatch(r"(.+?)(?::([A-Za-z_][\w.]*))?", spec)
    return m.group(1), m.group(2) or "application"


def module_for_file(path):
    """(sys.path entry, dotted module name) for a .py file."""
    path = os.path.abspath(path)
    directory, filename = os.path.split(path)
    parts = [os.path.splitext(filename)[0]]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, pkg = os.path.split(directory)
        parts.insert(0, pkg)
    return directory, ".".join(parts)


def load_app(spec):
    target, attr = split_app(spec)
    if "/" in target or target.endswith(".py"):
        root, modname = module_for_file(target)
    else:
        root, modname = os.getcwd(), target
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(modname)
    obj = module
    for name in attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise AppImportError(f"{modname} has no attribute {attr!r} (wsgi_path = {spec})") from None
    if not callable(obj):
        raise AppImportError(f"{modname}:{attr} is not callable (wsgi_path = {spec})")
    return obj
