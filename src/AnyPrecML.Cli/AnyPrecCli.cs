using System.CommandLine;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using AnyPrecML.MLNet.Scoring;
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
        RepackCommand.Create(),
        ProfileCommand.Create(),
        EvalCommand.Create(),
        ExportCommand.Create(),
        ScoreCommand.Create(),
        ClusterCommand.Create(),
        ServeCommand.Create(),
        SynthCommand.Create(),
        BenchCommand.Create(),
    };

    /// <summary>Exit code for bad input: options, files, data.</summary>
    public const int ExitBadInput = 2;
    /// <summary>Exit code for a failure of the program itself.</summary>
    public const int ExitInternal = 1;
    /// <summary>Exit code after Ctrl-C (128 + SIGINT, as shells report it).</summary>
    public const int ExitCancelled = 130;

    /// <summary>Shows the stack trace of a failure (on every command).</summary>
    internal static readonly Option<bool> Verbose = new("--verbose") { Description = "On failure, also print the stack trace.", Recursive = true };

    /// <summary>
    /// Parses and runs <paramref name="args"/>, writing to the given writers (the console when null); returns the exit code.
    /// Every failure prints one line <c>error: what (where)</c>: exit code 2 for bad input, 1 for an internal failure,
    /// 130 when cancelled; <c>--verbose</c> adds the stack trace.
    /// </summary>
    public static int Run(string[] args, TextWriter? output = null, TextWriter? error = null)
    {
        var config = new InvocationConfiguration
        {
            Output = output ?? Console.Out, Error = error ?? Console.Error, EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = null,
        };
        var root = Build();
        root.Options.Add(Verbose);
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0 && parsed.Action is not System.CommandLine.Help.HelpAction)
        {
            foreach (var e in parsed.Errors) config.Error.WriteLine($"error: {OneLine(e.Message)} (command line; see --help)");
            return ExitBadInput;
        }
        try
        {
            // Ctrl-C and SIGTERM cancel the command's token instead of ending the process: commands stop at their next
            // check and clean up (quantize removes its temporary directory; score's output stays resumable).
            using var interrupted = new CancellationTokenSource();
            void Cancel(PosixSignalContext c) { c.Cancel = true; interrupted.Cancel(); }
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, Cancel);
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Cancel);
            return parsed.InvokeAsync(config, interrupted.Token).GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            var cause = Cause(e);
            if (cause is OperationCanceledException) { config.Error.WriteLine("error: cancelled (interrupted by a signal)"); return ExitCancelled; }
            int code = IsUserError(cause) ? ExitBadInput : ExitInternal;
            config.Error.WriteLine(code == ExitInternal
                ? $"error: internal failure: {OneLine(cause.Message)} (in {cause.TargetSite?.DeclaringType?.Name ?? "anyprec"}; --verbose shows the stack)"
                : $"error: {Describe(cause)}");
            if (parsed.GetValue(Verbose)) config.Error.WriteLine(e.ToString());
            return code;
        }
    }

    /// <summary>The exception behind wrappers: reflection, single-error aggregates, and ML.NET's cursors (which rethrow a row's error inside exceptions of their own).</summary>
    private static Exception Cause(Exception e)
    {
        while (e.InnerException is { } inner
               && (e is System.Reflection.TargetInvocationException || e is AggregateException { InnerExceptions.Count: 1 }
                   || e.Source?.StartsWith("Microsoft.ML", StringComparison.Ordinal) == true))
            e = inner;
        return e;
    }

    /// <summary>Errors caused by input (files, options, data); the rest are the program's own failures.</summary>
    private static bool IsUserError(Exception e) =>
        e is IOException or ArgumentException or FormatException or InvalidDataException or JsonException or NotSupportedException
          or InvalidOperationException or UnauthorizedAccessException or KeyNotFoundException;

    /// <summary>
    /// "what (where)": library messages lead with the place ("path: problem", "path:line: problem"); the place moves to
    /// the end, and .NET's argument decorations ("(Parameter 'x')", "Actual value was ...") are dropped.
    /// </summary>
    internal static string Describe(Exception e)
    {
        string m = e.Message;
        if (e is ArgumentException)
        {
            m = System.Text.RegularExpressions.Regex.Replace(m, @" \(Parameter '[^']*'\)", "");
            int actual = m.IndexOf("\nActual value was", StringComparison.Ordinal);
            if (actual >= 0) m = m[..actual];
        }
        m = OneLine(m);
        var place = System.Text.RegularExpressions.Regex.Match(m, @"^(?<where>[^\s:'""]*[/\\.][^\s'""]*?(:\d+)?): (?<what>.+)$");
        if (place.Success) m = $"{place.Groups["what"].Value.TrimEnd('.')} ({place.Groups["where"].Value})";
        return m;
    }

    private static string OneLine(string s) => s.ReplaceLineEndings(" ").Trim();

    /// <summary>One line of JSON, non-finite numbers as null plus a reason (see <see cref="JsonLines.Format"/>).</summary>
    internal static string ToJsonLine(object value) => JsonLines.Format(value);

    /// <summary>Writes <paramref name="value"/> as one line of JSON (non-finite numbers as null plus a reason).</summary>
    internal static void WriteJson(this ParseResult result, object value) =>
        result.InvocationConfiguration.Output.WriteLine(ToJsonLine(value));

    internal static TextWriter Out(this ParseResult result) => result.InvocationConfiguration.Output;
    internal static TextWriter Err(this ParseResult result) => result.InvocationConfiguration.Error;
}
