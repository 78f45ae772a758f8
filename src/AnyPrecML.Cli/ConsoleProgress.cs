using System.Diagnostics;
using System.Globalization;

namespace AnyPrecML.Cli;

/// <summary>
/// The one progress display of every command, on standard error. On an interactive terminal: a bar redrawn in place
/// with the count, rate, elapsed time and ETA. Redirected (a file, a pipe, the tests' writers): a plain line per tenth
/// of the work, with the same figures. The library reports through <see cref="IProgress{T}"/> and knows nothing of this.
/// </summary>
/// <remarks>
/// With an unknown total (<c>Total ≤ 0</c>) it shows the count and rate, and when redirected writes a line every
/// <c>plainEvery</c> items. <c>interactive</c> overrides the terminal test (for tests). Other lines a command writes while a bar is up go through <see cref="Line"/>, which clears
/// the bar, writes the line and redraws it.
/// </remarks>
internal sealed class ConsoleProgress<T>(TextWriter writer, string label, Func<T, (long Done, long Total)> measure, string unit = "", long plainEvery = 0,
    bool? interactive = null) : IProgress<T>
{
    private readonly Lock _lock = new();
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly bool _terminal = interactive ?? ConsoleProgress.IsInteractive(writer);
    private long _lastPlainStep = -1;
    private TimeSpan? _lastDraw;
    private string? _bar;

    public void Report(T value)
    {
        var (done, total) = measure(value);
        lock (_lock)
        {
            var elapsed = _clock.Elapsed;
            bool finished = total > 0 && done >= total;
            if (_terminal)
            {
                // Redraw at most 10 times a second: reports can come from every core at once.
                if (!finished && _lastDraw is { } last && elapsed - last < TimeSpan.FromMilliseconds(100)) return;
                _lastDraw = elapsed;
                _bar = Bar(done, total, elapsed);
                writer.Write($"\r{_bar}\u001b[K");
                if (finished) { writer.WriteLine(); _bar = null; }
                return;
            }
            long step = total > 0 ? 10 * done / total : plainEvery > 0 ? done / plainEvery : -1;
            if (step == _lastPlainStep || step < 0) return;
            _lastPlainStep = step;
            writer.WriteLine(Plain(done, total, elapsed));
        }
    }

    /// <summary>Writes <paramref name="line"/> on its own line (to <paramref name="to"/>, default the progress's writer), keeping the bar (if any) below it.</summary>
    public void Line(string line, TextWriter? to = null)
    {
        to ??= writer;
        lock (_lock)
        {
            if (_bar is null) { to.WriteLine(line); return; }
            writer.Write("\r\u001b[K");
            writer.Flush();
            to.WriteLine(line);
            to.Flush();
            writer.Write($"{_bar}\u001b[K");
        }
    }

    private string Bar(long done, long total, TimeSpan elapsed)
    {
        if (total <= 0) return $"{label} {done:N0}{Unit} {Rate(done, elapsed)}, {ConsoleProgress.Time(elapsed)}";
        const int Width = 30;
        int filled = (int)Math.Clamp(Width * done / total, 0, Width);
        string tail = done >= total ? $"done in {ConsoleProgress.Time(elapsed)}" : $"{Rate(done, elapsed)}, ETA {Eta(done, total, elapsed)}";
        return $"{label} [{new string('#', filled)}{new string('.', Width - filled)}] {100 * done / total,3}% {done:N0}/{total:N0}{Unit} {tail}";
    }

    private string Plain(long done, long total, TimeSpan elapsed)
    {
        if (total <= 0) return $"{label}: {done}{Unit} ({Rate(done, elapsed)}, {ConsoleProgress.Time(elapsed)} elapsed)";
        string tail = done >= total ? $"100%, {ConsoleProgress.Time(elapsed)}" : $"{100 * done / total}%, {ConsoleProgress.Time(elapsed)} elapsed, ETA {Eta(done, total, elapsed)}";
        return $"{label}: {done}/{total}{Unit} ({tail})";
    }

    private string Unit => unit.Length == 0 ? "" : " " + unit;

    private string Rate(long done, TimeSpan elapsed) =>
        string.Create(CultureInfo.InvariantCulture, $"{done / Math.Max(elapsed.TotalSeconds, 1e-9):0.##}{Unit}/s");

    /// <summary>The time left at the mean rate so far; "?" until something is done.</summary>
    private static string Eta(long done, long total, TimeSpan elapsed) =>
        done <= 0 ? "?" : ConsoleProgress.Time(TimeSpan.FromSeconds(elapsed.TotalSeconds * (total - done) / done));
}

/// <summary>Helpers of <see cref="ConsoleProgress{T}"/>.</summary>
internal static class ConsoleProgress
{
    /// <summary>A progress over plain (done, total) counts.</summary>
    public static ConsoleProgress<(int Done, int Total)> Steps(TextWriter writer, string label, string unit = "") =>
        new(writer, label, p => (p.Done, p.Total), unit);

    /// <summary>A progress over the bytes of a model being written.</summary>
    public static ConsoleProgress<Models.WriteProgress> Bytes(TextWriter writer, string label) => new(writer, label, p => (p.Done, p.Total), "bytes");

    /// <summary>True when <paramref name="writer"/> is the process's standard error and that is a terminal that can redraw a line.</summary>
    public static bool IsInteractive(TextWriter writer) =>
        ReferenceEquals(writer, Console.Error) && !Console.IsErrorRedirected && Environment.GetEnvironmentVariable("TERM") != "dumb";

    /// <summary>"4.2 s", "3:07", "1:02:03".</summary>
    public static string Time(TimeSpan t) =>
        t.TotalSeconds < 60 ? string.Create(CultureInfo.InvariantCulture, $"{t.TotalSeconds:0.0} s")
        : t.TotalHours < 1 ? $"{(int)t.TotalMinutes}:{t.Seconds:00}" : $"{(int)t.TotalHours}:{t.Minutes:00}:{t.Seconds:00}";
}
