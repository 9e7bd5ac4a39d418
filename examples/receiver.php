<?php
// Receive smsc_handler's relay in plain PHP: verify the Standard Webhooks signature,
// drop repeats by webhook-id, handle each event once. No library needed.
//
//   SMSC_RELAY_SECRET=whsec_... php -S 127.0.0.1:8000 receiver.php     (or any PHP host)
//
// and in smsc_handler's config.ini: [relay] url = https://your-site/receiver.php,
// secret = the same whsec_ value. SMSC_RELAY_DIR names a folder the script may write
// (default: ./smsc-relay beside it); keep it out of the web root.

$secret = getenv('SMSC_RELAY_SECRET') ?: '';
$folder = getenv('SMSC_RELAY_DIR') ?: __DIR__ . '/smsc-relay';
$tolerance = 300;  // seconds: a webhook-timestamp further off is a replay or a wrong clock

function answer($status, $text) {
    http_response_code($status);
    header('Content-Type: text/plain; charset=utf-8');
    exit($text);
}

if ($_SERVER['REQUEST_METHOD'] !== 'POST') answer(405, 'POST only');
$body = file_get_contents('php://input');  // the raw bytes: the signature covers them exactly
$id = $_SERVER['HTTP_WEBHOOK_ID'] ?? '';
$timestamp = $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? '';
$signatures = $_SERVER['HTTP_WEBHOOK_SIGNATURE'] ?? '';
$key = strncmp($secret, 'whsec_', 6) === 0 ? base64_decode(substr($secret, 6), true) : false;
if ($key === false || strlen($key) < 24) answer(500, 'SMSC_RELAY_SECRET is not a whsec_ secret');
if (!preg_match('/^[A-Za-z0-9_-]{1,100}$/', $id) || !preg_match('/^[0-9]{1,12}$/', $timestamp)) {
    answer(400, 'missing or malformed webhook headers');
}
if (abs(time() - (int)$timestamp) > $tolerance) answer(400, 'webhook-timestamp too far from now');

$expected = base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $key, true));
$valid = false;
foreach (explode(' ', $signatures) as $signature) {  // several while the sender rotates keys
    $parts = explode(',', $signature, 2);
    if (count($parts) === 2 && $parts[0] === 'v1' && hash_equals($expected, $parts[1])) $valid = true;
}
if (!$valid) answer(400, 'bad signature');
$event = json_decode($body, true);
if (!is_array($event)) answer(400, 'not a JSON object');

// One delivery at a time: under the lock, a repeat finds its id already recorded.
if (!is_dir("$folder/seen") && !mkdir("$folder/seen", 0700, true) && !is_dir("$folder/seen")) {
    answer(500, 'cannot create the data folder');
}
$lock = fopen("$folder/lock", 'c');
if ($lock === false || !flock($lock, LOCK_EX)) answer(500, 'cannot lock');
if (file_exists("$folder/seen/$id")) answer(200, 'repeat');

// Your code here. The example appends the event to events.jsonl.
if (file_put_contents("$folder/events.jsonl", $body . "\n", FILE_APPEND) === false) {
    answer(500, 'cannot store');  // not recorded as seen: the relay tries again
}
touch("$folder/seen/$id");  // only after the work is done
answer(204, '');
