"""Where messages go on: the interface every upstream kind implements, and SMTP smarthosts."""
