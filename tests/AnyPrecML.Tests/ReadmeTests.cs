using AnyPrecML.AI;
using Microsoft.Extensions.AI;

namespace AnyPrecML.Tests;

/// <summary>README code that is run here verbatim: the test compares the README block with its own marked region.</summary>
[TestClass]
public sealed class ReadmeTests
{
    private static string RepoFile(params string[] parts)
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "AnyPrecML.sln"))) return Path.Combine([d.FullName, .. parts]);
        throw new DirectoryNotFoundException("AnyPrecML.sln not found above the test binaries.");
    }

    /// <summary>The trimmed, non-empty lines of the ```csharp block after <paramref name="marker"/> in README.md.</summary>
    private static string[] ReadmeBlock(string marker)
    {
        var lines = File.ReadAllLines(RepoFile("README.md"));
        int at = Array.FindIndex(lines, l => l.StartsWith(marker, StringComparison.Ordinal));
        Assert.IsGreaterThanOrEqualTo(0, at, $"README.md has no '{marker}'");
        int open = Array.FindIndex(lines, at, l => l.StartsWith("```csharp", StringComparison.Ordinal));
        int close = Array.FindIndex(lines, open + 1, l => l.StartsWith("```", StringComparison.Ordinal));
        return [.. lines[(open + 1)..close].Select(l => l.Trim()).Where(l => l.Length > 0)];
    }

    /// <summary>The trimmed lines between "// README: name" and "// README: end" in this file.</summary>
    private static string[] Region(string name)
    {
        var lines = File.ReadAllLines(RepoFile("tests", "AnyPrecML.Tests", "ReadmeTests.cs")).Select(l => l.Trim()).ToArray();
        int open = Array.IndexOf(lines, "// README: " + name), close = Array.IndexOf(lines, "// README: end", open + 1);
        return [.. lines[(open + 1)..close].Where(l => l.Length > 0)];
    }

    [TestMethod]
    public async Task ChatSnippetIsThisCodeAndRuns()
    {
        CollectionAssert.AreEqual(Region("chat"), ReadmeBlock("<!-- snippet: chat"), "README's chat snippet and the code run here have drifted apart");

        // The snippet names the directory `anyprec quantize` wrote, relative to the working directory.
        using var fixture = new ChatFixture();
        string expected = fixture.Generate(3, 50);
        string dir = Path.GetFullPath("stories260K-ap");
        Assert.IsFalse(Directory.Exists(dir), $"{dir} is in the way");
        Directory.CreateDirectory(dir);
        try
        {
            foreach (string f in Directory.GetFiles(fixture.ModelDirectory)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
            var reply = await Snippet();
            Assert.AreEqual(expected, reply.Text);
            Assert.AreEqual(50, reply.Usage!.OutputTokenCount);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task<ChatResponse> Snippet()
    {
        // README: chat
        using IChatClient client = new AnyPrecisionChatClient("stories260K-ap");
        var options = new ChatOptions { ModelId = "stories260K-ap@3bit", MaxOutputTokens = 50 };
        ChatResponse reply = await client.GetResponseAsync("Once upon a time", options);
        Console.WriteLine($"{reply.Text} ({reply.Usage!.OutputTokenCount} tokens, {reply.FinishReason})");
        await foreach (var update in client.GetStreamingResponseAsync("Once upon a time", options)) Console.Write(update.Text);
        // README: end
        return reply;
    }
}
