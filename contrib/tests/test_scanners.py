"""The scanner integrations in contrib/ against a fixture of real keyplane tokens, tokens with a
wrong checksum and look-alikes (contrib/tests/fixtures/tokens.json says which is which).

Run by scripts/python-tests (a venv with the pinned detect-secrets under target/), which
scripts/test calls.
"""
import hashlib
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / 'contrib' / 'tests' / 'fixtures'
SCANNED = FIXTURES / 'leaky-config.txt'
PLUGIN = ROOT / 'contrib' / 'detect-secrets' / 'keyplane_plugin.py'
GITLEAKS_RULES = ROOT / 'contrib' / 'gitleaks' / 'keyplane.toml'

with open(FIXTURES / 'tokens.json') as f:
    TOKENS = json.load(f)


def detect_secrets() -> str:
    """The detect-secrets of this interpreter's venv."""
    found = shutil.which('detect-secrets', path=str(pathlib.Path(sys.executable).parent))
    if found is None:
        raise AssertionError('detect-secrets is not installed next to ' + sys.executable)
    return found


def sha1(text: str) -> str:
    # detect-secrets reports each finding as the SHA-1 of the secret, never the secret.
    return hashlib.sha1(text.encode()).hexdigest()


class FixtureIsWhatItSays(unittest.TestCase):
    def test_every_listed_string_is_in_the_scanned_file(self):
        text = SCANNED.read_text()
        for kind in ('real', 'wrong_checksum', 'look_alikes'):
            for token in TOKENS[kind]:
                self.assertIn(token, text, kind)


class DetectSecretsPlugin(unittest.TestCase):
    def scan(self) -> list:
        result = subprocess.run(
            [
                detect_secrets(), 'scan', '--all-files', '--plugin', str(PLUGIN),
                '--disable-filter', 'detect_secrets.filters.heuristic.is_indirect_reference',
                str(SCANNED),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertIn(
            'KeyplaneTokenDetector', [p['name'] for p in report['plugins_used']],
            'the plugin was loaded',
        )
        return [
            finding
            for findings in report['results'].values()
            for finding in findings
            if finding['type'] == 'keyplane token'
        ]

    def test_finds_exactly_the_real_tokens(self):
        findings = self.scan()
        found = sorted(f['hashed_secret'] for f in findings)
        self.assertEqual(found, sorted(sha1(t) for t in TOKENS['real']))
        self.assertEqual(len(findings), len(TOKENS['real']), 'each real token once')

    def test_checksum_rule_matches_the_format(self):
        spec = importlib.util.spec_from_file_location('keyplane_plugin', PLUGIN)
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        for token in TOKENS['real']:
            self.assertTrue(plugin.has_valid_checksum(token), token)
        for token in TOKENS['wrong_checksum']:
            self.assertFalse(plugin.has_valid_checksum(token), token)


class GitleaksRules(unittest.TestCase):
    """gitleaks itself is not packaged by Debian, so its rules' regular expressions are run here
    with Python's `re` (they use only syntax RE2 and `re` read alike). gitleaks cannot compute a
    checksum: its rules match the shape, so wrong-checksum tokens are matched too."""

    def test_rules_match_real_and_wrong_checksum_tokens_and_no_look_alike(self):
        with open(GITLEAKS_RULES, 'rb') as f:
            rules = tomllib.load(f)['rules']
        self.assertEqual(
            sorted(r['id'] for r in rules),
            ['keyplane-api-token', 'keyplane-robot-secret', 'keyplane-service-account-token'],
        )
        text = SCANNED.read_text()
        found = []
        for rule in rules:
            for match in re.finditer(rule['regex'], text):
                secret = match.group(rule['secretGroup'])
                self.assertTrue(
                    any(k in secret for k in rule['keywords']),
                    f"{rule['id']}: a match contains its keyword",
                )
                found.append(secret)
        self.assertEqual(sorted(found), sorted(TOKENS['real'] + TOKENS['wrong_checksum']))


if __name__ == '__main__':
    unittest.main()
