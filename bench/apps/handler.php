<?php
// The PHP-CGI peer: the same status callback as a shared-hosting user would write it
// in PHP (Debian's php-cgi). $_REQUEST-style merge of query and form, the md5 control
// hash checked with hash_equals, one JSON line appended under flock, fsync optional.
// Reads PEER_DATA_DIR, PEER_FSYNC (yes/no) and PEER_SECRET from the environment.
$params = array_merge($_GET, $_POST);
header('Content-Type: text/plain; charset=utf-8');
if (empty($params['phone'])) {
    http_response_code(400);
    echo "no phone\n";
    exit;
}
$secret = (string) getenv('PEER_SECRET');
$signed = ($params['id'] ?? '') . ':' . $params['phone'] . ':' . ($params['status'] ?? '') . ':' . $secret;
if (!hash_equals(md5($signed), strtolower((string) ($params['md5'] ?? '')))) {
    http_response_code(403);
    echo "Forbidden\n";
    exit;
}
$event = [
    'kind' => 'status',
    'id' => $params['id'] ?? null,
    'phone' => $params['phone'],
    'status' => ctype_digit($params['status'] ?? '') ? (int) $params['status'] : null,
    'received_at' => gmdate('Y-m-d\TH:i:s\Z'),
    'params' => $params,
];
$line = json_encode($event, JSON_INVALID_UTF8_SUBSTITUTE) . "\n";
$dir = getenv('PEER_DATA_DIR') ?: sys_get_temp_dir();
$file = fopen($dir . '/status.jsonl', 'ab');
if ($file === false || !flock($file, LOCK_EX) || fwrite($file, $line) !== strlen($line)) {
    http_response_code(503);
    header('Retry-After: 240');
    echo "Service Unavailable\n";
    exit;
}
fflush($file);
if (strtolower((string) getenv('PEER_FSYNC')) !== 'no' && function_exists('fdatasync')) {
    fdatasync($file);
}
fclose($file);
echo 'OK';
