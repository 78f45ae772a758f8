return AnyPrecML.Cli.AnyPrecCli.Run(args);
