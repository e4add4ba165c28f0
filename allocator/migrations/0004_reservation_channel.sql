-- What the fairness report groups reservations by (GET /api/v1/admin/rounds/{r}/fairness),
-- fixed when the claim is made: the channel it came through, the citizen's age band at the
-- round's opening date and the six-digit issuing region of the ID. Never the ID itself.
-- Rows written before this migration: channel 'api', no band, no region.

ALTER TABLE reservations
    ADD COLUMN channel  text NOT NULL DEFAULT 'api'
        CHECK (channel IN ('desk', 'web', 'mini-program', 'api')),
    ADD COLUMN age_band text CHECK (age_band IN ('0-17', '18-39', '40-64', '65+')),
    ADD COLUMN region   text CHECK (region ~ '^[0-9]{6}$');
