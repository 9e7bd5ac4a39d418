"""Hello-world WSGI app: the floor any server can reach (``hello_wsgi:application``)."""


def application(environ, start_response):
    """Read the body, answer 200 OK."""
    stream = environ.get("wsgi.input")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if stream is not None and length > 0:
        stream.read(length)
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "2")])
    return [b"OK"]
