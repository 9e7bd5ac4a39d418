#!/usr/bin/env python3
"""CGI entry: run smsc_handler's WSGI application for one request."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smsc_handler  # noqa: E402

smsc_handler.run_cgi()
