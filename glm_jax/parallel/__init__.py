"""Where sharding lives: the logical-axis rules table and the device mesh."""
