DROP TABLE data_planes;
DROP TABLE assignments;
DROP TABLE virtual_keys;
DROP TABLE provider_models;
DROP TABLE connections;
DROP TABLE config_state;
