-- One row per value a counter took; (counter, value) is unique, so two writers can never
-- both claim a value.
CREATE TABLE events (
    counter TEXT NOT NULL REFERENCES counters (name),
    value BIGINT NOT NULL CHECK (value > 0),
    PRIMARY KEY (counter, value)
);
