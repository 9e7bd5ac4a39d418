# gunicorn settings: /etc/smsc_handler/gunicorn.conf.py, run by smsc-handler-gunicorn.service.
# Put nginx or Apache (with TLS) in front and proxy to this address; set the handler's
# trusted_proxies = 127.0.0.1/32 so the caller's X-Forwarded-For address is used.
bind = "127.0.0.1:8000"
chdir = "/opt/smsc_handler"
raw_env = ["SMSC_HANDLER_CONFIG=/etc/smsc_handler/config.ini"]
workers = 2
# seconds before a silent worker is killed (SMSC then retries); keep it above [hook] timeout
timeout = 60
accesslog = "-"
