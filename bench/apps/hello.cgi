#!/usr/bin/env python3
"""Hello-world Python CGI: interpreter start plus one write, the floor of any CGI handler."""
import sys

sys.stdout.write("Status: 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK")
