"""What the tests use but do not test: loopback servers and fakes (Vault,
S3, Azure, GCS, credential endpoints, hostile and slow servers), the real
servers' launchers (OpenBao, moto, the GCS emulators, Azurite, tinyproxy),
archive builders, the bad-config corpus and the harness (fake clock and
signals, in-process agent runs).  Imported as ``from support import
harness`` or ``from support.harness import FakeClock``: tests/conftest.py
puts tests/ on sys.path; contrib/bench does the same."""
