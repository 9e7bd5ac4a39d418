#!/usr/bin/env python3
"""The minimal parse-and-append app under wsgiref's CGIHandler, as handler.cgi runs the handler."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wsgiref.handlers import CGIHandler  # noqa: E402

from minimal_append import application  # noqa: E402

os.environ.setdefault("PATH_INFO", "")
CGIHandler().run(application)
