<?php
// Hello-world PHP-CGI: the interpreter start of the PHP peer.
header('Content-Type: text/plain; charset=utf-8');
echo 'OK';
