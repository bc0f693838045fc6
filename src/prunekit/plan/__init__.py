"""Plan: importance criteria, targets and schedules -- what decides which units go."""
