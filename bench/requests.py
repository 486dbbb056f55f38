"""Sends N requests of one kind over one kept-alive HTTP/1.1 connection and checks every answer.

Used by bench/run.sh's callgrind part, which counts the server's instructions: the client only has
to be bounded and correct, not fast.

    python3 bench/requests.py PORT KIND COUNT   # KIND: hello | forward | introspect
    env: SUBJECT (the token verified), VERIFIER (a tokens:verify token, for introspect)
"""
import http.client
import os
import sys

port, kind, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
for _ in range(count):
    if kind == "hello":
        connection.request("GET", "/verify", headers={"Authorization": f"Bearer {os.environ['SUBJECT']}"})
    elif kind == "forward":
        connection.request("GET", "/v1/auth/forward", headers={"Authorization": f"Bearer {os.environ['SUBJECT']}"})
    elif kind == "introspect":
        connection.request(
            "POST",
            "/oauth2/introspect",
            body=f"token={os.environ['SUBJECT']}",
            headers={
                "Authorization": f"Bearer {os.environ['VERIFIER']}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
    else:
        sys.exit(f"unknown kind {kind}")
    response = connection.getresponse()
    body = response.read()
    if response.status != 200 or (kind == "introspect" and b'"active":true' not in body):
        sys.exit(f"{kind}: unexpected answer {response.status} {body[:200]!r}")
