#!/usr/bin/env python3
"""Hello-world WSGI app under wsgiref's CGIHandler: what the gateway alone costs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wsgiref.handlers import CGIHandler  # noqa: E402

from hello_wsgi import application  # noqa: E402

os.environ.setdefault("PATH_INFO", "")
CGIHandler().run(application)
