using System.CommandLine;
using System.Text.Json;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>The `anyprec` command line: one subcommand per file in this folder.</summary>
public static class AnyPrecCli
{
    /// <summary>Builds the command tree.</summary>
    public static RootCommand Build() => new("anyprec: inspect, convert, run and evaluate Llama-architecture models, any-precision ones among them.")
    {
        InfoCommand.Create(),
        ConvertCommand.Create(),
        GenerateCommand.Create(),
        PerplexityCommand.Create(),
        QuantizeCommand.Create(),
        EvalCommand.Create(),
        ExportCommand.Create(),
        ScoreCommand.Create(),
        ServeCommand.Create(),
        SynthCommand.Create(),
        BenchCommand.Create(),
    };

    /// <summary>Parses and runs <paramref name="args"/>, writing to the given writers (the console when null); returns the exit code.</summary>
    public static int Run(string[] args, TextWriter? output = null, TextWriter? error = null)
    {
        var config = new InvocationConfiguration { Output = output ?? Console.Out, Error = error ?? Console.Error, EnableDefaultExceptionHandler = false };
        try
        {
            return Build().Parse(args).Invoke(config);
        }
        catch (Exception e) when (IsUserError(Cause(e)))
        {
            config.Error.WriteLine($"error: {Cause(e).Message}");
            return 1;
        }
    }

    /// <summary>The exception behind ML.NET's wrappers (its cursors rethrow a row's error inside exceptions of their own).</summary>
    private static Exception Cause(Exception e)
    {
        while (e.InnerException is { } inner && e.Source?.StartsWith("Microsoft.ML", StringComparison.Ordinal) == true)
            e = inner;
        return e;
    }

    /// <summary>Errors caused by input (files, options) are reported in one line; others keep their stack trace.</summary>
    private static bool IsUserError(Exception e) =>
        e is ModelFormatException or FileNotFoundException or DirectoryNotFoundException or IOException
          or ArgumentException or FormatException or InvalidOperationException or UnauthorizedAccessException or OperationCanceledException;

    internal static readonly JsonSerializerOptions Json = new() { WriteIndented = false };

    /// <summary>Writes <paramref name="value"/> as one line of JSON.</summary>
    internal static void WriteJson(this ParseResult result, object value) =>
        result.InvocationConfiguration.Output.WriteLine(JsonSerializer.Serialize(value, Json));

    internal static TextWriter Out(this ParseResult result) => result.InvocationConfiguration.Output;
    internal static TextWriter Err(this ParseResult result) => result.InvocationConfiguration.Error;
}
