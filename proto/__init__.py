"""Wire contract: versioned protobuf definitions (dyspec/v1) and their generated Python stubs."""
