-- What the fairness report groups lottery entries by (GET /api/v1/admin/rounds/{r}/fairness),
-- fixed when the entry is made, as for reservations (0004): the channel it came through and the
-- citizen's age band at the round's opening date. Never the ID itself.
-- Rows written before this migration: channel 'api', no band.

ALTER TABLE entries
    ADD COLUMN channel  text NOT NULL DEFAULT 'api'
        CHECK (channel IN ('desk', 'web', 'mini-program', 'api')),
    ADD COLUMN age_band text CHECK (age_band IN ('0-17', '18-39', '40-64', '65+'));
