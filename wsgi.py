"""WSGI entry for uWSGI, gunicorn, mod_wsgi and waitress: ``wsgi:application``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smsc_handler import application  # noqa: E402

__all__ = ["application"]
