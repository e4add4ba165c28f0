-- Desk tokens: one per pharmacy counter or community desk, bound to one site. The token itself
-- is shown once, when it is created, and never stored: only its SHA-256 (hex) is kept here and
-- in Redis (allocator/desk.py). Revocation sets revoked_at; the row stays for the audit trail.

CREATE TABLE desk_tokens (
    token_id    text PRIMARY KEY,
    site_id     text NOT NULL REFERENCES sites,
    label       text NOT NULL CHECK (char_length(label) BETWEEN 1 AND 200),
    token_hash  text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX desk_tokens_by_site ON desk_tokens (site_id);
