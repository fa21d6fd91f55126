"""The paper's capability experiments, each a function that returns its figures and a report section."""
