DROP TABLE jobs;
DROP TABLE counter;
